"""Reference dequantize-matmul on packed compressed-tensors weights: the specification.

Every other kernel (Triton, CPU fast paths) must match these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.core.pack import unpack
from compressor.core.scheme import QParams, QuantScheme, dequantize

__all__ = ["dequantize_packed", "dequant_matmul"]


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: QuantScheme,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float weight from the packed layout.

    Args:
        packed: int32 (N, ceil(K*b/32)) codes, LSB-first, offset by 2^(b-1).
        scale: (N, G) float.
        zero_point: int32 (ceil(N*b/32), G) packed along dim 0, or None (symmetric).
        shape: (N, K).
        scheme: bits, group size, symmetry.
        g_idx: optional int (K,) group of each column.

    Returns:
        (N, K) weight in ``scale.dtype``, ``(q - zp) * scale``.
    """
    n, k = int(shape[0]), int(shape[1])
    q = unpack(packed, scheme.bits, k, dim=1)
    zp = None if zero_point is None else unpack(zero_point, scheme.bits, n, dim=0)
    return dequantize(q, QParams(scale, zp), scheme, g_idx)


def dequant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: QuantScheme,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias``: x (..., K) → (..., N) in ``x.dtype``."""
    w = dequantize_packed(packed, scale, zero_point, shape, scheme, g_idx).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
