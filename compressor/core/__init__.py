"""Floor 1, core: what every layer shares and nothing algorithmic.

Schemes and packing, module state, model knowledge (``arch``), the pass protocol and registry.
"""
