"""Triton online Hadamard transform: x ↦ x H_nᵀ / √n along the last dim, as ``OnlineHadamard`` computes it.

``H_n = kron(H_P, H_m)`` (``compressor.core.hadamard``) with ``H_P`` the
Sylvester matrix of P = 2^a, itself ``kron(H_P1, H_P2)``. A row of x, viewed as a
(P1, P2, m) tensor, is transformed one axis at a time, each by a small dense
matrix through ``tl.dot``:

* along m: ``H_m`` (zero-padded to a power of two >= 16, so padded lanes stay 0);
* along P2 and along P1: ``H_P2`` and ``H_P1`` (16-128 each, so ``tl.dot`` takes them).

That is O(n (m + P1 + P2)) multiply-adds per row on the tensor cores, one
launch per call. The matrices hold only ±1 and 0, exact in bf16, so each
product runs as two bf16 dots, of x's high and low bf16 halves, with fp32
accumulation: about 2^-17 relative error and fp32's range (massive activations
times sqrt(n) would overflow fp16). The interpreter uses fp32 dots instead. Powers of two below 16 (P < 16 with m > 1) are folded into the dense m
factor when the product is at most 128. Sizes the plan cannot cover
(:func:`plan` returns None) stay on the torch butterfly.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from compressor.core.hadamard import hadamard_factors, hadamard_matrix
from compressor.kernels.environment import interpreting

__all__ = ["plan", "hadamard_transform"]

_MIN_DOT = 16  # tl.dot's smallest dimension
_MAX_FACTOR = 128  # largest dense factor kept in one program
_ROW_ELEMS = 8192  # fp32 elements of x held by one program


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=None)
def plan(n: int) -> tuple[int, int, int] | None:
    """``(P1, P2, m)`` with ``n = P1 * P2 * m``, each power-of-two factor 1 or in [16, 128], m's padding <= 128;
    None when the kernel cannot cover n (too large or awkwardly split)."""
    try:
        p, m = hadamard_factors(n)
    except ValueError:
        return None
    if m > 1 and p < _MIN_DOT:  # fold the small power of two into the dense factor
        p, m = 1, p * m
    if m > _MAX_FACTOR or (m > 1 and _pow2_at_least(m) > _MAX_FACTOR):
        return None
    if p == 1:
        return (1, 1, m) if m > 1 else None
    if p < _MIN_DOT:  # pure power of two below 16: the torch butterfly is as good
        return None
    if p <= _MAX_FACTOR:
        return 1, p, m
    a = p.bit_length() - 1
    p1, p2 = 1 << (a // 2), 1 << (a - a // 2)
    if p1 < _MIN_DOT or p2 > _MAX_FACTOR:
        return None
    if n > 32768:  # one row must fit a program's registers
        return None
    return p1, p2, m


@functools.lru_cache(maxsize=None)
def _factors_cpu(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (H_P1, H_P2, padded H_mᵀ) on the CPU for size n (1x1 placeholders for absent factors)."""
    p1, p2, m = plan(n)
    one = torch.ones(1, 1)
    h1 = hadamard_matrix(p1, dtype=torch.float32) if p1 > 1 else one
    h2 = hadamard_matrix(p2, dtype=torch.float32) if p2 > 1 else one
    if m > 1:
        hm = hadamard_matrix(m, dtype=torch.float32)  # H_m, or kron(H_p, H_m') where a small p was folded in
        mp = max(_MIN_DOT, _pow2_at_least(m))
        hmt = torch.zeros(mp, mp)
        hmt[:m, :m] = hm.T
    else:
        hmt = one
    return h1.contiguous(), h2.contiguous(), hmt.contiguous()


_DEVICE_FACTORS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _factors(n: int, device: torch.device):
    key = (n, device)
    if key not in _DEVICE_FACTORS:
        _DEVICE_FACTORS[key] = tuple(t.to(device) for t in _factors_cpu(n))
    return _DEVICE_FACTORS[key]


@triton.jit
def _mode_product(x, h_ptr, R: tl.constexpr, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                  SPLIT_BF16: tl.constexpr):
    """(R, A, B, C) fp32 → the same tensor multiplied along its last axis by the (C, C) ±1/0 matrix at ``h_ptr``.

    SPLIT_BF16: x = hi + lo with both parts bf16 (16 significant bits together), two tensor-core dots
    with the exact ±1 matrix, fp32 accumulation: about 2^-17 relative error, fp32's range. Otherwise an
    fp32 "ieee" dot (the interpreter, whose bf16 dot is wrong).
    """
    offs = tl.arange(0, C)
    h = tl.load(h_ptr + offs[:, None] * C + offs[None, :])
    x2 = tl.reshape(x, (R * A * B, C))
    if SPLIT_BF16:
        h = h.to(tl.bfloat16)
        hi = x2.to(tl.bfloat16)
        lo = (x2 - hi.to(tl.float32)).to(tl.bfloat16)
        y = tl.dot(lo, h, tl.dot(hi, h))
    else:
        y = tl.dot(x2, h, input_precision="ieee")
    return tl.reshape(y, (R, A, B, C))


@triton.jit
def hadamard_kernel(
    x_ptr, out_ptr, h1_ptr, h2_ptr, hm_ptr, ROWS, stride_x, stride_o, scale,
    P1: tl.constexpr, P2: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_BF16: tl.constexpr,
):
    """out[r] = x[r] @ H_nᵀ * scale for BLOCK_R rows, n = P1 * P2 * M (see the module docstring)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i1 = tl.arange(0, P1)
    i2 = tl.arange(0, P2)
    j = tl.arange(0, MP)
    col = (i1[None, :, None, None] * P2 + i2[None, None, :, None]) * M + j[None, None, None, :]
    mask = (r[:, None, None, None] < ROWS) & (j[None, None, None, :] < M)
    x = tl.load(x_ptr + r[:, None, None, None] * stride_x + col, mask=mask, other=0).to(tl.float32)
    if M > 1:
        x = _mode_product(x, hm_ptr, BLOCK_R, P1, P2, MP, SPLIT_BF16)  # along m: x @ H_mᵀ
    if P2 > 1:
        x = tl.permute(_mode_product(tl.permute(x, (0, 1, 3, 2)), h2_ptr, BLOCK_R, P1, MP, P2, SPLIT_BF16), (0, 1, 3, 2))
    if P1 > 1:
        x = tl.permute(_mode_product(tl.permute(x, (0, 2, 3, 1)), h1_ptr, BLOCK_R, P2, MP, P1, SPLIT_BF16), (0, 3, 1, 2))
    tl.store(out_ptr + r[:, None, None, None] * stride_o + col, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) → x @ H_nᵀ / √n, same shape and dtype (fp16 / bf16 / fp32 in, fp32 arithmetic).

    Raises:
        ValueError: n has no kernel plan (check :func:`plan` first) or x is not floating.
    """
    n = x.shape[-1]
    shape = plan(n)
    if shape is None:
        raise ValueError(f"no Triton Hadamard plan for size {n}: use compressor.core.hadamard.hadamard_transform")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x has dtype {x.dtype}: the Triton Hadamard takes float16, bfloat16 or float32")
    p1, p2, m = shape
    mp = max(_MIN_DOT, _pow2_at_least(m)) if m > 1 else 1
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(x.shape)
    width = p1 * p2 * mp
    # every tl.dot needs at least 16 rows: BLOCK_R * (the other axes) >= 16
    block_r = max(1, min(64, _ROW_ELEMS // width))
    block_r = 1 << (block_r.bit_length() - 1)
    block_r = max(block_r, _MIN_DOT // max(1, min(p1 * p2, p1 * mp, p2 * mp)))
    h1, h2, hm = _factors(n, x.device)
    grid = (triton.cdiv(rows, block_r),)
    hadamard_kernel[grid](x2, out, h1, h2, hm, rows, x2.stride(0), out.stride(0), 1.0 / math.sqrt(n),
                          P1=p1, P2=p2, M=m, MP=mp, BLOCK_R=block_r, SPLIT_BF16=not interpreting(),
                          num_warps=4 if width <= 4096 else 8)
    return out.reshape(x.shape)
