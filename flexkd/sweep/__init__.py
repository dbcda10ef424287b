"""``flexkd tune``: Ray Tune sweeps of distill trials that share one teacher pass, and their report."""
