"""CPU fast path for 4-bit weights: torch's int4 CPU matmul (``aten._weight_int4pack_mm_for_cpu``).

torch ships a fused int4 x float matmul for CPUs that reads a weight repacked
into its own tile layout (two codes per byte) with per-group ``(scale, zero)``
pairs and computes ``x @ ((q_u - 8) * scale + zero).T``. Our compressed-tensors
codes map onto it exactly:

* integer zero point ``z``: ``(q - z) * s = (q_u - 8) * s - z * s``, so ``zero = -z * s``;
* symmetric: ``zero = 0``;
* ``zero_point="float"`` offset ``o``: ``q_u * s + o = (q_u - 8) * s + (o + 8 s)``.

The op's group size must be one of 32, 64, 128, 256 and divide K. Our groups
may be wider (per-channel, 512...): they are split into op groups that repeat
the same scale, which is exact. Not covered (callers fall back to the
reference): bits other than 4, ``g_idx``, and K with no such divisor that
also divides the group width (ragged last groups included), and N not a
multiple of 16.

The repack is a one-time cost per layer (:func:`prepare_int4`, timed in
``benchmarks/cpu_decode.py``); :class:`compressor.export.loader.QuantLinear`
caches the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.export.pack import unpack
from compressor.quant.scheme import QuantScheme

__all__ = ["Int4Weight", "int4_unsupported", "prepare_int4", "int4_matmul"]

_OP_GROUPS = (256, 128, 64, 32)


@dataclass(frozen=True)
class Int4Weight:
    """A weight repacked for ``aten._weight_int4pack_mm_for_cpu``.

    Attributes:
        packed: uint8 (N, K/2) in the op's tile layout.
        scale_zeros: (K/group, N, 2) scale and zero in the activation dtype.
        group: the op's group size (32, 64, 128 or 256).
        n, k: the weight shape.
    """

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    group: int
    n: int
    k: int


def _op_group(k: int, width: int) -> int | None:
    """Largest op group size dividing both the group width and K, or None."""
    for g in _OP_GROUPS:
        if width % g == 0 and k % g == 0:
            return g
    return None


def int4_unsupported(scheme: QuantScheme, n: int, k: int, g_idx: torch.Tensor | None = None) -> str | None:
    """Why the int4 CPU op cannot run an (N, K) weight (a sentence), or None when it can."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"this torch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu"
    if scheme.bits != 4:
        return f"it takes 4-bit weights, not {scheme.bits}-bit"
    if g_idx is not None:
        return "activation order (g_idx) is not supported by the int4 CPU op"
    if n % 16:
        return f"it needs N divisible by 16, got N={n}"
    width = scheme.group_width(k)
    if _op_group(k, width) is None:
        return (f"group width {width} with K={k} has no common divisor in {_OP_GROUPS} "
                "(ragged last groups are not supported by the int4 CPU op)")
    return None


def prepare_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: QuantScheme,
    dtype: torch.dtype,
) -> Int4Weight:
    """Repack a compressed-tensors weight for the int4 CPU op (once per layer).

    Args:
        packed: int32 (N, K/8) codes, LSB-first, offset by 8.
        scale: (N, G) float.
        zero_point: int32 (ceil(N/8), G) packed along dim 0, a float (N, G)
            offset (``zero_point="float"``), or None (symmetric).
        shape: (N, K).
        scheme: a 4-bit scheme that :func:`int4_unsupported` accepts.
        dtype: activation dtype the op will be called with (float32, bfloat16 or float16).

    Returns:
        :class:`Int4Weight`.
    """
    n, k = int(shape[0]), int(shape[1])
    why = int4_unsupported(scheme, n, k)
    if why is not None:
        raise ValueError(f"the int4 CPU path cannot run this weight: {why}; use backend='reference'")
    width = scheme.group_width(k)
    group = _op_group(k, width)
    q_u = unpack(packed, 4, k, dim=1).to(torch.int32) + 8  # (N, K) unsigned codes
    s = scale.float()  # (N, G)
    if zero_point is None:
        zero = torch.zeros_like(s)
    elif scheme.float_zero_point:
        zero = zero_point.float() + 8 * s
    else:
        zero = -unpack(zero_point, 4, n, dim=0).float() * s
    repeat = width // group
    # each of our groups becomes `repeat` op groups with the same scale / zero
    s, zero = s.repeat_interleave(repeat, dim=1)[:, : k // group], zero.repeat_interleave(repeat, dim=1)[:, : k // group]
    scale_zeros = torch.stack([s.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (K/group, N, 2)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_u.contiguous(), 1)
    return Int4Weight(weight, scale_zeros, group, n, k)


def int4_matmul(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with the int4 CPU op: x (..., K) → (..., N) in ``x.dtype``.

    ``x`` must be a CPU tensor in the dtype :func:`prepare_int4` was given.
    """
    if x.shape[-1] != weight.k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight has K={weight.k} input features")
    if x.dtype != weight.scale_zeros.dtype:
        raise ValueError(f"x is {x.dtype} but the int4 weight was prepared for {weight.scale_zeros.dtype}")
    lead = x.shape[:-1]
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, weight.k).contiguous(), weight.packed,
                                                      weight.group, weight.scale_zeros)
    out = out.reshape(*lead, weight.n)
    return out if bias is None else out + bias.to(out.dtype)

