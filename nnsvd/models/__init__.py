"""Model builders and loaders (plain PyTorch / transformers; no Hydra, no W&B)."""
