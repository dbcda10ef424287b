"""MLflow: runs and logged configs, the model registry that holds students, and the plots logged with them."""
