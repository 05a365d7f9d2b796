"""Job entrypoints (`python -m jobs.prepare | jobs.train | jobs.evaluate | jobs.tune`) and the JobSpec schema."""
