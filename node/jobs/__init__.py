"""Jobs: the durable store, PET/MR matching, fetching a prior MR, the pipeline, and the worker
that schedules and runs jobs."""
