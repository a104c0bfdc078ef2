"""Jobs: the durable store, PET/MR matching, fetching a prior MR, the pipeline, and where jobs run."""
