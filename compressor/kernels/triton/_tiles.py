"""Triton device functions shared by the kernels: read codes from the packed layout, dequantize a tile.

Layout (compressor/core/pack.py): code ``i`` along the packed dimension sits at
bits ``[i*b, (i+1)*b)`` of an LSB-first stream of int32 words, offset by
``2^(b-1)``. At 1, 2, 4 and 8 bits a code never straddles two words; at 3, 5, 6
and 7 bits it may, and the high part is read from the next word.

Two ways to read a (BLOCK_N, BLOCK_K) tile of codes:

* word-wise (1, 2, 4, 8 bits, ``BLOCK_K`` a multiple of the 32 / bits codes per
  word): load each int32 word once, as a (BLOCK_N, words) tile of contiguous
  vector loads, then split every word into its codes by halving it
  log2(32 / bits) times (low half, high half, ``tl.interleave``), which keeps
  the codes in packing order and in the registers that loaded them;
* per code (any width, codes that straddle included): every code computes its
  word and shift and loads its word (and the next one where it straddles).
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
def split_words(words, BITS: tl.constexpr):
    """(R, C) int32 words → (R, C * 32 / BITS) unsigned codes in packing order (32 % BITS == 0).

    Each level splits every value into its low and high halves and interleaves
    them along the last axis, so value ``c`` becomes ``(lo(c), hi(c))`` in place:
    after log2(32 / BITS) levels element ``w * 32 / BITS + j`` is code ``j`` of word ``w``.
    """
    v = words
    for level in tl.static_range(5):
        if (16 >> level) >= BITS:
            lo = v & ((1 << (16 >> level)) - 1)
            hi = (v >> (16 >> level)) & ((1 << (16 >> level)) - 1)  # arithmetic shift, then masked
            v = tl.interleave(lo, hi)
    return v


@triton.jit
def load_codes(w_ptr, offs_n, k0, N, K, W_WORDS, stride_wn, stride_ww,
               BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) unsigned int32 codes of rows ``offs_n``, columns ``k0 + [0, BLOCK_K)``; 0 outside.

    Word-wise when ``32 % BITS == 0`` and ``BLOCK_K`` holds whole words
    (``k0`` is then a multiple of the codes per word), per code otherwise.
    Columns past K inside the last word are read as whatever the padding holds
    (zeros from ``pack``); callers mask them through x or the dequantized tile.
    """
    nn = offs_n[:, None]
    if 32 % BITS == 0 and BLOCK_K % (32 // BITS) == 0:
        ww = k0 * BITS // 32 + tl.arange(0, BLOCK_K * BITS // 32)[None, :]
        words = tl.load(w_ptr + nn * stride_wn + ww * stride_ww, mask=(nn < N) & (ww < W_WORDS), other=0)
        return split_words(words, BITS)
    kk = k0 + tl.arange(0, BLOCK_K)[None, :]
    return unpack_codes(w_ptr, kk, nn * stride_wn, stride_ww, W_WORDS, (nn < N) & (kk < K), BITS)


@triton.jit
def row_scales(s_ptr, z_ptr, offs_n, g, N, Z_WORDS, stride_sn, stride_sg, stride_zw, stride_zg,
               BITS: tl.constexpr, ZP_MODE: tl.constexpr):
    """Scale and zero point (both fp32, (BLOCK_N,)) of group ``g`` (a scalar) for rows ``offs_n``.

    ZP_MODE 0: zero = 2^(BITS-1) (symmetric); 1: the packed integer zero point;
    2: the float offset (``w = q * scale + zero`` with q already ``q_signed - qmin``).
    """
    n_ok = offs_n < N
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0).to(tl.float32)
    if ZP_MODE == 0:
        z = tl.zeros_like(s) + (1 << (BITS - 1))
    elif ZP_MODE == 1:
        z = unpack_codes(z_ptr, offs_n, g * stride_zg, stride_zw, Z_WORDS, n_ok, BITS).to(tl.float32)
    else:
        z = tl.load(z_ptr + offs_n * stride_zw + g * stride_zg, mask=n_ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def dequant_codes(q, s_ptr, z_ptr, g_ptr, offs_n, k0, N, K, Z_WORDS,
                  stride_sn, stride_sg, stride_zw, stride_zg,
                  BITS: tl.constexpr, GROUP_W: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                  HAS_GIDX: tl.constexpr, ZP_MODE: tl.constexpr):
    """Dequantize the (BLOCK_N, BLOCK_K) codes ``q`` of rows ``offs_n``, columns from ``k0``: fp32, 0 outside (N, K).

    Scales and zero points come per row when the tile lies in one group, per
    element otherwise (``g_idx``, or groups narrower than the tile). ZP_MODE: 0
    symmetric, 1 packed integer zero point (int32 (ceil(N*b/32), G)), 2 float
    offset (N, G) with ``w = (q - qmin) * scale + offset``. The values are fp32
    products of a code and a 16-bit scale, exact; :func:`weight_as` rounds them
    as the reference does.
    """
    nn = offs_n[:, None]
    kk = k0 + tl.arange(0, BLOCK_K)[None, :]
    n_ok = nn < N
    mask = n_ok & (kk < K)
    if (not HAS_GIDX) and (ONE_GROUP or GROUP_W % BLOCK_K == 0):
        s, z = row_scales(s_ptr, z_ptr, offs_n, 0 if ONE_GROUP else k0 // GROUP_W, N, Z_WORDS,
                          stride_sn, stride_sg, stride_zw, stride_zg, BITS, ZP_MODE)
        s = s[:, None]
        z = z[:, None]
    else:
        if HAS_GIDX:
            g = tl.load(g_ptr + kk, mask=kk < K, other=0)
        else:
            g = kk // GROUP_W
        s = tl.load(s_ptr + nn * stride_sn + g * stride_sg, mask=mask, other=0).to(tl.float32)
        if ZP_MODE == 0:
            z = (1 << (BITS - 1))
        elif ZP_MODE == 1:
            z = unpack_codes(z_ptr, nn, g * stride_zg, stride_zw, Z_WORDS, mask, BITS).to(tl.float32)
        else:
            z = tl.load(z_ptr + nn * stride_zw + g * stride_zg, mask=mask, other=0).to(tl.float32)
    if ZP_MODE == 2:
        w = to_f32(q) * s + z  # q is already q_signed - qmin
    else:
        w = (to_f32(q) - z) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def to_f32(q):
    """Unsigned int32 codes (< 2^23) → fp32, exactly: the code's bits become a float's mantissa above 2^23."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


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
