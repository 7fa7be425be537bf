"""Reference dequantize-matmul on packed compressed-tensors weights: the specification.

Every other kernel (Triton, CPU fast paths) must match these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.core import floats
from compressor.core.pack import unpack
from compressor.core.scheme import QParams, QuantScheme, dequantize

__all__ = ["dequantize_packed", "dequant_matmul", "dequantize_float", "unpack_fp4"]


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


def unpack_fp4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """E2M1 storage nibbles of a packed FP4 matrix: uint8 (N, K/2), even column in the low nibble → int8 (N, K)."""
    n = packed.shape[0]
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out.to(torch.int8)


def dequantize_float(
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    scheme: QuantScheme,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Float weight of one linear stored in a compressed-tensors float format (see
    :mod:`compressor.export.compressed_tensors`).

    Args:
        tensors: FP8 ``{"weight": float8_e4m3fn (N, K), "weight_scale": (N, G)}``; NVFP4 ``{"weight_packed": uint8
            (N, K/2), "weight_scale": float8_e4m3fn (N, K/16), "weight_global_scale": float32 (1,)}``; MXFP4
            ``{"weight_packed": uint8 (N, K/2), "weight_scale": uint8 (N, K/32)}``.
        shape: (N, K).
        scheme: the float scheme.
        dtype: the result's dtype.

    Returns:
        (N, K) in ``dtype``: ``value * scale`` (FP8 in the scale's dtype, as compressed-tensors does), ``value *
        (scale / global_scale)`` in float32 (NVFP4), ``value * 2^(e - 127)`` (MXFP4), then cast.
    """
    k = int(shape[1])
    if scheme.bits == 8:
        codes = tensors["weight"].view(torch.uint8).view(torch.int8)
        scale = tensors["weight_scale"]
        if scheme.block_rows is not None:  # (ceil(N / rows), G) block scales, one per block of rows; (1,) per tensor
            rows = scheme.rows_per_scale(int(shape[0]))
            scale = scale.reshape(-1, scale.shape[-1]).repeat_interleave(rows, dim=0)[: int(shape[0])]
        return dequantize(codes, QParams(scale, None), scheme).to(dtype)
    codes = unpack_fp4(tensors["weight_packed"], k)
    if scheme.scale_format == "e4m3":
        qp = QParams(tensors["weight_scale"].float(), None, tensors["weight_global_scale"].float())
    else:
        qp = QParams(floats.e8m0_decode(tensors["weight_scale"]), None)
    return dequantize(codes, qp, scheme).to(dtype)
