"""Quantization state carried by a compressed ``nn.Linear`` between passes and export.

A quantized module keeps its ``weight`` parameter holding the dequantized
(on-grid) values, so the model runs unchanged, and gains:

* ``weight_scale`` buffer (N, G), ``weight_zero_point`` buffer (N, G) or absent,
  ``weight_g_idx`` buffer (K,) int32 when columns were reordered (actorder);
* ``quant_scheme`` attribute, the :class:`QuantScheme`.

Export re-derives the integer codes from the weight and checks that the
weight is exactly on its grid.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.scheme import QParams, QuantScheme

__all__ = ["attach_qparams", "quant_state", "is_quantized", "QUANT_BUFFERS"]

QUANT_BUFFERS = ("weight_scale", "weight_zero_point", "weight_g_idx")  # what attach_qparams adds beside the weight


def attach_qparams(
    module: nn.Module,
    scheme: QuantScheme,
    qp: QParams,
    weight: torch.Tensor,
    g_idx: torch.Tensor | None = None,
) -> None:
    """Store a quantized weight and its parameters on ``module`` (in place).

    Args:
        module: the layer; its ``weight`` data is replaced by ``weight``.
        scheme: the scheme used.
        qp: scale and zero point, (N, G).
        weight: (N, K) dequantized weight, same dtype as the module's weight.
        g_idx: optional (K,) group of each column.
    """
    # a new Parameter (not .data) so a weight tied to another module (lm_head ↔
    # embeddings) is untied instead of silently quantized in both places
    old = module.weight
    module.weight = nn.Parameter(weight.detach().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    for name in QUANT_BUFFERS:
        if name in module._buffers:
            del module._buffers[name]
    module.register_buffer("weight_scale", qp.scale.detach().clone())
    if qp.zero_point is not None:
        module.register_buffer("weight_zero_point", qp.zero_point.detach().clone())
    if g_idx is not None:
        module.register_buffer("weight_g_idx", g_idx.detach().to(torch.int32).clone())
    module.quant_scheme = scheme


def is_quantized(module: nn.Module) -> bool:
    """Whether :func:`attach_qparams` was applied to ``module``."""
    return isinstance(getattr(module, "quant_scheme", None), QuantScheme)


def quant_state(module: nn.Module) -> tuple[QuantScheme, QParams, torch.Tensor | None] | None:
    """``(scheme, qparams, g_idx)`` of a quantized module, or None."""
    if not is_quantized(module):
        return None
    zp = module._buffers.get("weight_zero_point")
    return module.quant_scheme, QParams(module.weight_scale, zp), module._buffers.get("weight_g_idx")
