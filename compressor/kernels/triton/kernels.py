"""Triton kernels computing ``x @ dequant(W).T (+ bias)`` straight from the packed layout.

* ``decode_kernel``: M <= 16. Grid (N tiles, SPLIT_K). Each program streams a
  (BLOCK_N, BLOCK_K) weight tile per step through every SPLIT_K-th K block,
  dequantizes it once and applies it to all M rows (row by row for BLOCK_M < 16,
  ``tl.dot`` for BLOCK_M = 16); partial sums are added atomically into a zeroed
  fp32 (M, N) buffer. Memory-bound: the weight is read once, the work spread
  over N tiles x SPLIT_K programs to fill the GPU.
* ``gemm_kernel``: larger M. Grid over (M, N) tiles with grouped ordering for L2
  reuse; a (BLOCK_K, BLOCK_N) tile is dequantized in registers and fed to
  ``tl.dot`` with fp32 accumulation; bias fused; output in x's dtype.
* ``dequant_kernel``: writes the (N, K) weight in x's dtype, for the
  dequantize + cuBLAS crossover at very large M.

``*_tuned`` are the ``triton.autotune`` wrappers (keyed by M bucket, N, K, bits,
group width). Under the interpreter, or with ``autotune=False``, the launcher
calls the plain kernels with one fixed config (``launch.fixed_config``).
The dequantized weight is computed in the scale's dtype (as the reference
does) and cast to x's dtype before the product. ``DOT_F32`` upcasts both dot
operands to fp32 (fp32 activations, and the interpreter, whose bf16 dot is wrong).
"""

from __future__ import annotations

import triton
import triton.language as tl

from compressor.kernels.triton._tiles import dequant_tile, round_to, weight_as

DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    for bn, bk, sk, w, s in [
        (32, 128, 4, 4, 2), (64, 128, 2, 4, 2), (64, 64, 8, 4, 2), (128, 64, 4, 4, 2),
        (32, 256, 8, 4, 2), (16, 256, 4, 2, 2), (64, 128, 8, 4, 3), (128, 128, 1, 8, 2),
    ]
]

GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (32, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (32, 128, 128, 4, 3),
    ]
]

TUNE_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_W"]


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def decode_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr,
    M, N, K, W_WORDS, Z_WORDS, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg, stride_om,
    BITS: tl.constexpr, GROUP_W: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_GIDX: tl.constexpr, ZP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """out (M, N) fp32, zeroed by the caller, += x (M, K) @ dequant(W).T; bias added by split 0."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kk = k0 + offs_k
        w = dequant_tile(
            w_ptr, s_ptr, z_ptr, g_ptr, offs_n[:, None], kk[None, :], k0, N, K, W_WORDS, Z_WORDS,
            stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg,
            BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE,
        )
        w = weight_as(w, s_ptr.dtype.element_ty, x_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_K)
        if BLOCK_M >= 16:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0)  # (BLOCK_M, BLOCK_K)
            acc = _dot(x, tl.trans(w), acc, DOT_F32)
        else:
            wf = w.to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                x = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=(kk < K) & (kk * 0 + m < M), other=0)  # (BLOCK_K,)
                part = tl.sum(wf * x.to(tl.float32)[None, :], axis=1)  # (BLOCK_N,)
                acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr,
    M, N, K, W_WORDS, Z_WORDS, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg, stride_om,
    BITS: tl.constexpr, GROUP_W: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_GIDX: tl.constexpr, ZP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) in x's dtype = x (M, K) @ dequant(W).T (+ bias)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n  # grouped ordering: GROUP_M row tiles share each weight tile in L2
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0)  # (BLOCK_M, BLOCK_K)
        w = dequant_tile(
            w_ptr, s_ptr, z_ptr, g_ptr, offs_n[None, :], kk[:, None], k0, N, K, W_WORDS, Z_WORDS,
            stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg,
            BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE,
        )
        w = weight_as(w, s_ptr.dtype.element_ty, x_ptr.dtype.element_ty)  # (BLOCK_K, BLOCK_N)
        acc = _dot(x, w, acc, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], round_to(acc, out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def dequant_kernel(
    w_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    N, K, W_WORDS, Z_WORDS,
    stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg, stride_on,
    BITS: tl.constexpr, GROUP_W: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_GIDX: tl.constexpr, ZP_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (N, K) in its own dtype = dequant(W), computed in the scale's dtype then cast."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    w = dequant_tile(
        w_ptr, s_ptr, z_ptr, g_ptr, offs_n[:, None], kk[None, :], k0, N, K, W_WORDS, Z_WORDS,
        stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg,
        BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE,
    )
    mask = (offs_n[:, None] < N) & (kk[None, :] < K)
    w = weight_as(w, s_ptr.dtype.element_ty, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * stride_on + kk[None, :], w, mask=mask)


decode_tuned = triton.autotune(configs=DECODE_CONFIGS, key=TUNE_KEY, reset_to_zero=["out_ptr"])(decode_kernel)
gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=TUNE_KEY)(gemm_kernel)
