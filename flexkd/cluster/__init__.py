"""Where a pipeline runs: a local Ray, a Ray cluster through the Jobs API, shared storage."""
