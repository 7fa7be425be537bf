"""CPU fast paths: torch's int4 and int8 CPU matmuls behind our packed layout.

**4-bit** (``aten._weight_int4pack_mm_for_cpu``). torch ships a fused int4 x
float matmul for CPUs that reads a weight repacked into its own tile layout
(two codes per byte) with per-group ``(scale, zero)`` pairs and computes
``x @ ((q_u - 8) * scale + zero).T``. Our compressed-tensors codes map onto it
exactly:

* integer zero point ``z``: ``(q - z) * s = (q_u - 8) * s - z * s``, so ``zero = -z * s``;
* symmetric: ``zero = 0``;
* ``zero_point="float"`` offset ``o``: ``q_u * s + o = (q_u - 8) * s + (o + 8 s)``.

The op's group size must be one of 32, 64, 128, 256 and divide K. Our groups
may be wider (per-channel, 512...): they are split into op groups that repeat
the same scale, which is exact. Not covered (callers fall back to the
reference): ``g_idx``, and K with no such divisor that also divides the group
width (ragged last groups included), and N not a multiple of 16.

**8-bit** (``aten._weight_int8pack_mm``): ``x @ (q * s).T`` with int8 codes
(N, K) and one scale per output channel, no zero point. It covers symmetric
per-channel 8-bit weights (the usual W8A16 / W8A8 weight grid); our signed
8-bit codes are its int8 codes as they are. On x86 its bf16 kernel (AVX2 /
AVX-512) reads activations and codes with aligned 16-element vector loads
(torch's ``aten/src/ATen/native/cpu/int8mm_kernel.cpp``): it needs K divisible
by 16 (otherwise it reads past each row and returns garbage or crashes, as
K = 72 and K = 100 did here) and 32-byte aligned rows, so
:func:`int8_matmul` copies a misaligned input first. Not covered: groups,
asymmetric grids, ``g_idx``.

The repack is a one-time cost per layer (:func:`prepare`, timed in
``benchmarks/cpu_decode.py``); :class:`compressor.runtime.quant_linear.QuantLinear`
caches the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.core.pack import unpack
from compressor.core.scheme import QuantScheme

__all__ = ["Int4Weight", "Int8Weight", "int4_unsupported", "int8_unsupported", "unsupported", "prepare_int4",
           "prepare_int8", "prepare", "int4_matmul", "int8_matmul", "matmul"]

_OP_GROUPS = (256, 128, 64, 32)
_INT8_K_MULTIPLE = 16  # the AVX-512 bf16 kernel steps over K 16 elements at a time, without a tail
_ALIGN = 64  # bytes; the kernels' aligned loads need 32, torch's CPU allocator gives 64


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


@dataclass(frozen=True)
class Int8Weight:
    """A weight prepared for ``aten._weight_int8pack_mm``.

    Attributes:
        codes: int8 (N, K), contiguous: the signed codes as exported.
        scale: (N,) per-channel scale in the activation dtype.
        n, k: the weight shape.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    n: int
    k: int


def int8_unsupported(scheme: QuantScheme, n: int, k: int, g_idx: torch.Tensor | None = None) -> str | None:
    """Why the int8 CPU op cannot run an (N, K) weight (a sentence), or None when it can."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"this torch ({torch.__version__}) has no aten._weight_int8pack_mm"
    if scheme.bits != 8:
        return f"it takes 8-bit weights, not {scheme.bits}-bit"
    if not scheme.symmetric:
        return "the int8 CPU op has no zero point: it takes symmetric 8-bit weights"
    if g_idx is not None:
        return "activation order (g_idx) is not supported by the int8 CPU op"
    width = scheme.group_width(k)
    if width != k:
        return f"the int8 CPU op takes one scale per output channel (group_size -1), not groups of {width}"
    if k % _INT8_K_MULTIPLE:
        return f"the int8 CPU op needs K divisible by {_INT8_K_MULTIPLE}, got K={k}"
    return None


def unsupported(scheme: QuantScheme, n: int, k: int, g_idx: torch.Tensor | None = None) -> str | None:
    """Why no CPU fast path can run an (N, K) weight (a sentence), or None when one can (4 or 8 bits)."""
    if scheme.bits == 4:
        return int4_unsupported(scheme, n, k, g_idx)
    if scheme.bits == 8:
        return int8_unsupported(scheme, n, k, g_idx)
    return f"the CPU fast paths take 4-bit (int4 op) or symmetric per-channel 8-bit (int8 op) weights, " \
           f"not {scheme.bits}-bit"


def prepare_int8(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: QuantScheme,
    dtype: torch.dtype,
) -> Int8Weight:
    """Unpack a compressed-tensors 8-bit weight for the int8 CPU op (once per layer).

    Args:
        packed: int32 (N, K/4) codes, LSB-first, offset by 128.
        scale: (N, 1) float.
        zero_point: must be None (symmetric).
        shape: (N, K).
        scheme: an 8-bit scheme that :func:`int8_unsupported` accepts.
        dtype: activation dtype the op will be called with (bfloat16 is the fast one).

    Returns:
        :class:`Int8Weight`.
    """
    n, k = int(shape[0]), int(shape[1])
    why = int8_unsupported(scheme, n, k)
    if why is None and zero_point is not None:
        why = "a zero point was given for a symmetric scheme"
    if why is not None:
        raise ValueError(f"the int8 CPU path cannot run this weight: {why}; use backend='reference'")
    codes = _aligned(unpack(packed, 8, k, dim=1))  # (N, K) int8; K % 16 keeps every row aligned after the first
    return Int8Weight(codes, scale.reshape(n).to(dtype).contiguous(), n, k)


def prepare(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: QuantScheme,
    dtype: torch.dtype,
) -> Int4Weight | Int8Weight:
    """:func:`prepare_int4` or :func:`prepare_int8`, by the scheme's bits (arguments as there)."""
    if scheme.bits == 8:
        return prepare_int8(packed, scale, zero_point, shape, scheme, dtype)
    return prepare_int4(packed, scale, zero_point, shape, scheme, dtype)


def _apply(x: torch.Tensor, k: int, n: int, dtype: torch.dtype, what: str, op, bias: torch.Tensor | None):
    """Checks x (..., K) against the prepared weight, runs ``op`` on its (M, K) rows, adds the bias: (..., N)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight has K={k} input features")
    if x.dtype != dtype:
        raise ValueError(f"x is {x.dtype} but the {what} weight was prepared for {dtype}")
    out = op(x.reshape(-1, k)).reshape(*x.shape[:-1], n)
    return out if bias is None else out + bias.to(out.dtype)


def int4_matmul(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with the int4 CPU op: x (..., K) → (..., N) in ``x.dtype``.

    ``x`` must be a CPU tensor in the dtype :func:`prepare_int4` was given.
    """
    def op(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), weight.packed, weight.group,
                                                           weight.scale_zeros)

    return _apply(x, weight.k, weight.n, weight.scale_zeros.dtype, "int4", op, bias)


def _aligned(rows: torch.Tensor) -> torch.Tensor:
    """(M, K) rows as a contiguous tensor whose data starts on a ``_ALIGN``-byte boundary."""
    rows = rows.contiguous()
    return rows if rows.data_ptr() % _ALIGN == 0 else rows.clone()


def int8_matmul(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with the int8 CPU op: x (..., K) → (..., N) in ``x.dtype``.

    ``x`` must be a CPU tensor in the dtype :func:`prepare_int8` was given; a
    view that does not start on an aligned address is copied first (the op's
    vector loads need it).
    """
    def op(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(_aligned(rows), weight.codes, weight.scale)

    return _apply(x, weight.k, weight.n, weight.scale.dtype, "int8", op, bias)


def matmul(x: torch.Tensor, weight: Int4Weight | Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`int4_matmul` or :func:`int8_matmul`, by the prepared weight's kind: x (..., K) → (..., N)."""
    if isinstance(weight, Int8Weight):
        return int8_matmul(x, weight, bias)
    return int4_matmul(x, weight, bias)
