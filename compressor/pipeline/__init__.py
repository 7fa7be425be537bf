"""Sequential block pipeline: input capture, activation cache, checkpoints."""
