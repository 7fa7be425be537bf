"""Floor 3, runtime: the ``nn.Module``s a compressed or reloaded model runs (``QuantLinear``, online Hadamards, quantizers)."""
