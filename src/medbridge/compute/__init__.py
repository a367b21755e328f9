"""The compute side: the job wrapper that holds a job's credentials while it runs."""
