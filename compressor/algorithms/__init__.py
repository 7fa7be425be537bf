"""Floor 4, algorithms: the maths of every pass, as functions on tensors and modules (no pass, no pipeline)."""
