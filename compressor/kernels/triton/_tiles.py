"""Triton device functions shared by the kernels: read codes from the packed layout, dequantize a tile.

Layout (compressor/export/pack.py): code ``i`` along the packed dimension sits at
bits ``[i*b, (i+1)*b)`` of an LSB-first stream of int32 words, offset by
``2^(b-1)``. At 1, 2, 4 and 8 bits a code never straddles two words; at 3, 5, 6
and 7 bits it may, and the high part is read from the next word.

Device functions take index tensors that broadcast against each other
(``nn`` output rows, ``kk`` input columns), so one helper serves the
(BLOCK_N, BLOCK_K) tile of the decode kernel and the (BLOCK_K, BLOCK_N) tile of
the GEMM kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def unpack_codes(ptr, elem, base, stride_word, n_words, mask, BITS: tl.constexpr):
    """Unsigned codes (int32, in [0, 2^BITS)) of elements ``elem`` along a packed dimension.

    ``ptr + base + word * stride_word`` addresses the word holding each element;
    ``n_words`` bounds the second word read for codes that straddle.
    """
    bit = elem * BITS
    word = bit // 32
    shift = bit % 32
    lo = tl.load(ptr + base + word * stride_word, mask=mask, other=0)
    if 32 % BITS == 0:
        # arithmetic shift is harmless: the BITS bits kept all lie inside the word
        code = (lo >> shift) & ((1 << BITS) - 1)
    else:
        straddles = shift + BITS > 32
        hi = tl.load(ptr + base + (word + 1) * stride_word, mask=mask & straddles & (word + 1 < n_words), other=0)
        lo_u = lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
        # (32 - shift) & 31 keeps the shift count legal where the word does not straddle (value unused there)
        hi_u = hi.to(tl.uint32, bitcast=True) << ((32 - shift) & 31).to(tl.uint32)
        code = (tl.where(straddles, lo_u | hi_u, lo_u) & ((1 << BITS) - 1)).to(tl.int32)
    return code


@triton.jit
def dequant_tile(
    w_ptr, s_ptr, z_ptr, g_ptr,
    nn, kk, k0, N, K, W_WORDS, Z_WORDS,
    stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg,
    BITS: tl.constexpr, GROUP_W: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GIDX: tl.constexpr, ZP_MODE: tl.constexpr,
):
    """Dequantized weights ``W[nn, kk]`` in fp32 (see :func:`weight_as`); 0 outside (N, K).

    ``nn`` and ``kk`` broadcast to the tile shape; ``k0`` is the tile's first
    column (used when the whole tile lies in one group). ZP_MODE: 0 symmetric,
    1 packed integer zero point (int32 (ceil(N*b/32), G)), 2 float offset (N, G)
    with ``w = (q - qmin) * scale + offset``.
    """
    n_ok = nn < N
    mask = n_ok & (kk < K)
    q = unpack_codes(w_ptr, kk, nn * stride_wn, stride_ww, W_WORDS, mask, BITS)
    if HAS_GIDX:
        g = tl.load(g_ptr + kk, mask=kk < K, other=0)
        g_mask = mask
    elif ONE_GROUP:
        g = 0
        g_mask = n_ok
    elif GROUP_W % BLOCK_K == 0:
        g = k0 // GROUP_W  # the whole tile lies in one group: one scale per row
        g_mask = n_ok
    else:
        g = kk // GROUP_W
        g_mask = mask
    s = tl.load(s_ptr + nn * stride_sn + g * stride_sg, mask=g_mask, other=0).to(tl.float32)
    # fp32 arithmetic: a code (<= 8 bits) times a 16-bit scale is exact in fp32, so rounding the
    # product once to the scale's dtype (``round_to``) equals the reference's fp16/bf16 product
    if ZP_MODE == 0:
        w = (q - (1 << (BITS - 1))).to(tl.float32) * s
    elif ZP_MODE == 1:
        z = unpack_codes(z_ptr, nn, g * stride_zg, stride_zw, Z_WORDS, g_mask, BITS)
        w = (q - z).to(tl.float32) * s
    else:
        z = tl.load(z_ptr + nn * stride_zw + g * stride_zg, mask=g_mask, other=0).to(tl.float32)
        w = q.to(tl.float32) * s + z  # q is already q_signed - qmin
    return tl.where(mask, w, 0.0)


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """Cast fp32 ``v`` (finite) to DTYPE, rounding to nearest even.

    For bf16 the rounding is done on the bits first: Triton's interpreter
    truncates fp32 to bf16 (even with ``fp_downcast_rounding="rtne"``), and a
    value already on the bf16 grid converts exactly on every backend.
    """
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return v.to(DTYPE)


@triton.jit
def weight_as(w, S_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr):
    """fp32 dequantized weights → the scale's dtype (as the reference computes them) → x's dtype."""
    if S_DTYPE != tl.float32:
        w = round_to(w, S_DTYPE)
        if S_DTYPE == X_DTYPE:
            return w
        w = w.to(tl.float32)
    return round_to(w, X_DTYPE)
