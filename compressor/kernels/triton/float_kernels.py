"""Triton kernel computing ``x @ dequant(W).T (+ bias)`` straight from the float layouts of compressed-tensors.

``float_gemm_kernel`` reads the stored codes and scales (:class:`compressor.runtime.float_linear.FloatQuantLinear`)
and decodes them in registers, tile by tile, so the (N, K) float weight is never written out:

* ``FMT = 0``, FP8: codes are the bytes of ``float8_e4m3fn`` (N, K), decoded by their bit fields
  (``(8 + m) · 2^(e - 10)``, subnormals ``m · 2^-9``), times ``weight_scale`` (N, G) in its float dtype;
* ``FMT = 1``, NVFP4: two E2M1 codes per byte (N, K/2), low nibble first, decoded as ``(2 + m) · 2^(e - 2)``
  (``m / 2`` for e = 0), times the E4M3 group scale (N, K/16; bytes decoded as FP8) divided by the float32
  global scale;
* ``FMT = 2``, MXFP4: the same E2M1 codes times ``2^(code - 127)`` from the E8M0 byte of each 32.

Decoding by arithmetic works the same compiled (sm_90, where the fp8 bytes could also be cast natively) and in
Triton's CPU interpreter, which is how the tests run it. The weight tile is built in fp32, cast to x's dtype
(fp32 in the interpreter, whose bf16 dot is wrong) and fed to ``tl.dot`` with fp32 accumulation; bias fused;
output in x's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

FMT_FP8, FMT_NVFP4, FMT_MXFP4 = 0, 1, 2


@triton.jit
def _e4m3(b):
    """float8_e4m3fn bytes (int32 tensor, 0-255) → fp32 values (NaN codes 0x7F / 0xFF are not produced here).

    Normal values are rebuilt as fp32 bit patterns (exponent rebiased from 7 to 127, mantissa shifted up);
    subnormals are ``m · 2^-9``."""
    e = (b >> 3) & 15
    m = b & 7
    sign = (b >> 7) & 1
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    return tl.where(e == 0, tl.where(sign == 1, -sub, sub), normal)


@triton.jit
def _e2m1(c):
    """E2M1 nibbles (int32, 0-15, sign in bit 3) → fp32 values in ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}: twice the
    magnitude is the integer ``m`` (e = 0) or ``(2 + m) << (e - 1)``."""
    idx = c & 7
    e = idx >> 1
    m = idx & 1
    twice = tl.where(e == 0, m, (2 + m) << tl.maximum(e - 1, 0))
    mag = twice.to(tl.float32) * 0.5
    return tl.where(((c >> 3) & 1) == 1, -mag, mag)


@triton.jit
def float_gemm_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, b_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_om, stride_on,
    FMT: tl.constexpr, GROUP_W: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROW_BLOCK: tl.constexpr = 1,
):
    """out (M, N) = x (M, K) @ dequant(W).T (+ bias), W in format ``FMT`` (module docstring).

    ``w_ptr``: uint8 codes, (N, K) for FP8 or (N, K/2) packed for FP4; ``s_ptr``: (N, G) scales (float for FP8,
    uint8 E4M3 bytes for NVFP4, uint8 E8M0 for MXFP4); ``gs_ptr``: NVFP4's (1,) float32 global scale. When
    ``GROUP_W`` is a multiple of ``BLOCK_K`` every K tile lies in one group: its scales are one (BLOCK_N,)
    load per tile instead of one per element. ``ROW_BLOCK``: rows per scale row (FP8 block weights, 128; else 1).
    """
    ONE_SCALE: tl.constexpr = GROUP_W % BLOCK_K == 0
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    srow = offs_n // ROW_BLOCK  # the scale row of each weight row
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FMT == 1:
        gs = tl.load(gs_ptr).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        wmask = mask_n[:, None] & mask_k[None, :]
        if ONE_SCALE:  # (BLOCK_N, 1): the tile's one group
            s_off = srow[:, None] * stride_sn + (k0 // GROUP_W) * stride_sg
            smask = mask_n[:, None]
        else:  # (BLOCK_N, BLOCK_K): a group per element
            s_off = srow[:, None] * stride_sn + (kk // GROUP_W)[None, :] * stride_sg
            smask = wmask
        if FMT == 0:
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :] * stride_wk, mask=wmask, other=0)
            s = tl.load(s_ptr + s_off, mask=smask, other=0.0).to(tl.float32)
            w = _e4m3(b.to(tl.int32)) * s
        else:
            byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + (kk // 2)[None, :] * stride_wk, mask=wmask, other=0)
            code = (byte.to(tl.int32) >> ((kk % 2) * 4)[None, :]) & 15
            sb = tl.load(s_ptr + s_off, mask=smask, other=0).to(tl.int32)
            if FMT == 1:
                s = _e4m3(sb) / gs
            else:
                s = tl.exp2((sb - 127).to(tl.float32))
            w = _e2m1(code) * s  # (BLOCK_N, BLOCK_K) fp32
        w = tl.where(wmask, w, 0.0).to(x_ptr.dtype.element_ty)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
