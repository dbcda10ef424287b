"""``flexkd watch``: distill every new teacher release and promote the student when it is better."""
