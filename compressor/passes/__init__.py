"""The passes: thin adapters a recipe names (a frozen config, the statistics it collects, a call into the maths).

Importing this package registers every built-in pass with
:mod:`compressor.core.passes` (each module's ``@register_pass``). The list below
is the whole registry of built-in passes: a new pass is a module here and a
line below. :mod:`compressor.recipe` imports this package; nothing below the
passes layer does.
"""

from compressor.passes import (  # noqa: F401  (each registers its pass)
    activations,  # quantize_activations
    allocate_bits,  # allocate_bits
    adaround,  # adaround
    awq,  # awq
    distill,  # distill
    distill_blocks,  # distill_blocks
    gguf,  # gguf
    gptq,  # gptq
    hadamard_inputs,  # hadamard_inputs
    ostquant,  # ostquant
    prune,  # prune
    prune_experts,  # prune_experts
    rotate,  # rotate
    rtn,  # rtn
    structured,  # prune_structured
)
