"""The pipeline file: one validated schema, loaded once, saved with every artifact."""
