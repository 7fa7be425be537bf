"""Floor 5, engines: the sequential and layer-wise pipelines, activation cache, block checkpoints,
the scheduling of passes, the distillation trainer."""
