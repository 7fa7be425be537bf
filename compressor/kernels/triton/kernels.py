"""Triton kernels computing ``x @ dequant(W).T (+ bias)`` straight from the packed layout.

* ``decode_kernel``: M <= 16. Grid (N tiles, SPLIT_K). Each program streams a
  (BLOCK_N, BLOCK_K) tile of codes per step through every SPLIT_K-th K block.
  With one row (BLOCK_M = 1, a GEMV) it multiplies the codes by x and applies
  scale and zero point once per row and tile where the tile lies in one group
  (``sum_k (q - z) s x = s (sum_k q x - z sum_k x)``), else per element; with
  BLOCK_M = 16 (2-16 rows) it dequantizes the tile and uses ``tl.dot``.
  Split-K partial sums are added atomically into an fp32 workspace; the last
  program of each N tile (an atomic counter tells it) takes the sums out with
  ``atomic_xchg`` (which leaves the workspace zeroed for the next call), adds
  the bias and writes the output in x's dtype. One launch, no memset, no cast.
* ``gemm_kernel``: larger M. Grid over (M, N) tiles with grouped ordering for L2
  reuse; a (BLOCK_N, BLOCK_K) tile is dequantized in registers and fed
  transposed to ``tl.dot`` with fp32 accumulation; bias fused; output in x's dtype.
* ``dequant_kernel``: writes the (N, K) weight in x's dtype, for the
  dequantize + cuBLAS crossover at very large M.

Codes are read word-wise at 1, 2, 4 and 8 bits (``_tiles.load_codes``).
``*_tuned`` are the ``triton.autotune`` wrappers (keyed by M bucket, N, K, bits,
group width). Under the interpreter, or with ``autotune=False``, the launcher
calls the plain kernels with one fixed config (``launch.fixed_config``).
Where a tile is dequantized, it is computed in the scale's dtype (as the
reference does) and cast to x's dtype before the product. ``DOT_F32`` upcasts
both dot operands to fp32 (fp32 activations, and the interpreter, whose bf16
dot is wrong).
"""

from __future__ import annotations

import triton
import triton.language as tl

from compressor.kernels.triton._tiles import dequant_codes, load_codes, round_to, row_scales, to_f32, weight_as

DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "USE_DOT": dot}, num_warps=w, num_stages=2)
    for bn, bk, sk, w, dot in [
        # one row: the GEMV (CUDA cores) or tl.dot with the row padded to 16 (tensor cores)
        (16, 256, 4, 4, False), (32, 256, 4, 4, False), (16, 512, 2, 4, False), (32, 128, 8, 4, False),
        (64, 256, 2, 8, False), (8, 512, 4, 2, False),
        (32, 256, 4, 4, True), (64, 128, 4, 4, True), (64, 256, 2, 4, True), (16, 256, 8, 4, True),
        (128, 128, 2, 8, True),
    ]
]


def prune_decode_configs(configs, named_args, **kwargs):
    """Past one row only the tl.dot branch runs, so the GEMV configs would be timed twice for nothing."""
    if named_args["M"] == 1:
        return configs
    return [c for c in configs if c.kwargs["USE_DOT"]]


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
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, W_WORDS, Z_WORDS, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_ww, stride_sn, stride_sg, stride_zw, stride_zg, stride_om,
    BITS: tl.constexpr, GROUP_W: tl.constexpr, ONE_GROUP: tl.constexpr,
    HAS_GIDX: tl.constexpr, ZP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr = False,
):
    """out (M, N) in its own dtype = x (M, K) @ dequant(W).T (+ bias).

    ``ws_ptr``: fp32 workspace of at least M * N zeros, ``cnt_ptr``: int32
    counters, at least one per N tile, zero; both are left zero on return.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # every row of a tile has one scale and zero point: factor them out of the sum over k
    ROW_SCALED: tl.constexpr = (not HAS_GIDX) and (ONE_GROUP or GROUP_W % BLOCK_K == 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if BLOCK_M == 1 and not USE_DOT:
        offs_m = tl.arange(0, 1)
        acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + kk * stride_xk, mask=kk < K, other=0).to(tl.float32)  # (BLOCK_K,)
            q = load_codes(w_ptr, offs_n, k0, N, K, W_WORDS, stride_wn, stride_ww, BITS, BLOCK_K)
            if ROW_SCALED:
                # sum_k (q - z) s x = s (sum_k q x - z sum_k x)
                s, z = row_scales(s_ptr, z_ptr, offs_n, 0 if ONE_GROUP else k0 // GROUP_W, N, Z_WORDS,
                                  stride_sn, stride_sg, stride_zw, stride_zg, BITS, ZP_MODE)
                t = tl.sum(to_f32(q) * x[None, :], axis=1)  # (BLOCK_N,)
                xs = tl.sum(x, axis=0)
                if ZP_MODE == 2:
                    acc1 += s * t + z * xs
                else:
                    acc1 += s * (t - z * xs)
            else:
                w = dequant_codes(q, s_ptr, z_ptr, g_ptr, offs_n, k0, N, K, Z_WORDS,
                                  stride_sn, stride_sg, stride_zw, stride_zg,
                                  BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE)
                w = weight_as(w, s_ptr.dtype.element_ty, x_ptr.dtype.element_ty).to(tl.float32)
                acc1 += tl.sum(w * x[None, :], axis=1)
        acc = acc1[None, :]  # (1, BLOCK_N)
    else:
        offs_m = tl.arange(0, 16)  # tl.dot's minimum; rows past M are masked
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0)  # (16, BLOCK_K)
            q = load_codes(w_ptr, offs_n, k0, N, K, W_WORDS, stride_wn, stride_ww, BITS, BLOCK_K)
            if ROW_SCALED:
                # codes (< 256) are exact in fp16 / bf16: t = x @ q.T, then scale and zero point per row
                s, z = row_scales(s_ptr, z_ptr, offs_n, 0 if ONE_GROUP else k0 // GROUP_W, N, Z_WORDS,
                                  stride_sn, stride_sg, stride_zw, stride_zg, BITS, ZP_MODE)
                t = _dot(x, tl.trans(to_f32(q).to(x_ptr.dtype.element_ty)), tl.zeros((16, BLOCK_N), dtype=tl.float32),
                         DOT_F32)
                xs = tl.sum(x.to(tl.float32), axis=1)[:, None]  # (16, 1)
                if ZP_MODE == 2:
                    acc += t * s[None, :] + xs * z[None, :]
                else:
                    acc += (t - xs * z[None, :]) * s[None, :]
            else:
                w = dequant_codes(q, s_ptr, z_ptr, g_ptr, offs_n, k0, N, K, Z_WORDS,
                                  stride_sn, stride_sg, stride_zw, stride_zg,
                                  BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE)
                w = weight_as(w, s_ptr.dtype.element_ty, x_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_K)
                acc = _dot(x, tl.trans(w), acc, DOT_F32)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
        tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty), mask=out_mask)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=out_mask)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1)  # acq_rel: the partial sums above are visible first
        if arrived == SPLIT_K - 1:  # the last split of this N tile finishes it
            # swap the sums out for zeros as int32 bits (the interpreter has no float exchange)
            bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros_like(acc).to(tl.int32), mask=out_mask)
            total = bits.to(tl.float32, bitcast=True)
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
            tl.store(out_ptrs, round_to(total, out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


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
        q = load_codes(w_ptr, offs_n, k0, N, K, W_WORDS, stride_wn, stride_ww, BITS, BLOCK_K)
        w = dequant_codes(q, s_ptr, z_ptr, g_ptr, offs_n, k0, N, K, Z_WORDS,
                          stride_sn, stride_sg, stride_zw, stride_zg,
                          BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE)
        w = weight_as(w, s_ptr.dtype.element_ty, x_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_K)
        acc = _dot(x, tl.trans(w), acc, DOT_F32)
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
    q = load_codes(w_ptr, offs_n, k0, N, K, W_WORDS, stride_wn, stride_ww, BITS, BLOCK_K)
    w = dequant_codes(q, s_ptr, z_ptr, g_ptr, offs_n, k0, N, K, Z_WORDS,
                      stride_sn, stride_sg, stride_zw, stride_zg,
                      BITS, GROUP_W, ONE_GROUP, BLOCK_K, HAS_GIDX, ZP_MODE)
    mask = (offs_n[:, None] < N) & (kk[None, :] < K)
    w = weight_as(w, s_ptr.dtype.element_ty, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * stride_on + kk[None, :], w, mask=mask)


decode_tuned = triton.autotune(configs=DECODE_CONFIGS, key=TUNE_KEY,
                               prune_configs_by={"early_config_prune": prune_decode_configs})(decode_kernel)  # the workspace cleans itself
gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=TUNE_KEY)(gemm_kernel)
