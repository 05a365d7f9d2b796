"""A run's contracts, torch-free: what every layer (the API included) may import.

The run folder (`folder`), the prepared-data manifest (`manifest`), the metrics
record and its one reader and writer (`records`), the evaluation report and its
final-table view (`report`), row and column names (`names`), the markdown table
renderer (`tables`), the progress fold (`progress`), environment variable names
(`env`), where a served run answers (`serving`) and the storage layer over pyarrow.fs (`storage`). Nothing here imports
torch or Ray.
"""
