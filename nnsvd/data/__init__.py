"""Dataset loaders and tokenization (no Hydra, no W&B)."""
