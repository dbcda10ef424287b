"""The Flex-KD method as pure tensor functions: importance, selection, losses, the objective and
layer maps. Nothing here imports Ray, MLflow or the pipeline, so it drops into any training loop."""
