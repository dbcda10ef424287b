"""The pipeline runner and the list of stages it chains."""
