"""Hugging Face models and tokenizers: loading, building from configs, checks before work starts."""
