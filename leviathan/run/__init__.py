"""A run's contracts, torch-free: what every layer (the API included) may import.

The storage layer over pyarrow.fs, the metrics record, the markdown table
renderer and the progress fold. Nothing here imports torch or Ray.
"""
