"""Floor 6, export: the compressed-tensors writer, the loader, checkpoints, summaries and accelerate placement."""
