"""Host side of the Triton dequant-matmul: input validation, path choice, configs, launches.

Paths (``path="auto"`` picks by the number of rows ``M`` of the flattened input):

* ``M <= DECODE_MAX_M``: ``decode`` (split-K GEMV-style, memory-bound);
* ``DECODE_MAX_M < M < DEQUANT_MATMUL_MIN_M``: ``gemm`` (fused dequant + ``tl.dot``);
* ``M >= DEQUANT_MATMUL_MIN_M``: ``dequant`` (write the (N, K) weight in x's
  dtype with a Triton kernel, then ``torch.nn.functional.linear``, i.e. cuBLAS).
  At large M the matmul is compute-bound and the extra 2 bytes per weight of
  traffic is small beside it. The threshold is a first guess, not yet measured
  on a GPU: ``python -m benchmarks.kernel_speed --paths`` times both sides to set it.

Autotuning (``autotune=True``) goes through ``triton.autotune`` keyed by
(M bucket, N, K, bits, group width); the choice is cached per key for the
process. It is bypassed, with :func:`fixed_config`, under ``TRITON_INTERPRET=1``
(the interpreter cannot run multi-config autotune) and when ``autotune=False``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compressor.kernels.environment import interpreting
from compressor.kernels.triton import kernels

__all__ = [
    "DECODE_MAX_M",
    "DEQUANT_MATMUL_MIN_M",
    "PATHS",
    "interpreting",
    "select_path",
    "fixed_config",
    "validate",
    "dequant_matmul",
    "dequantize",
]

DECODE_MAX_M = 16
DEQUANT_MATMUL_MIN_M = 1024
PATHS = ("auto", "decode", "gemm", "dequant")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def select_path(m: int) -> str:
    """Kernel path for ``m`` rows: ``decode``, ``gemm`` or ``dequant`` (see the module docstring)."""
    if m <= DECODE_MAX_M:
        return "decode"
    return "gemm" if m < DEQUANT_MATMUL_MIN_M else "dequant"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _m_bucket(m: int) -> int:
    """Autotune bucket of M: the next power of two, capped at 4096."""
    return min(4096, 1 << max(0, math.ceil(math.log2(max(m, 1)))))


def _pow2_divisor(width: int, cap: int) -> int:
    """The largest power of two <= cap that divides ``width`` (at least 16, the dot minimum)."""
    b = cap
    while b > 16 and width % b:
        b //= 2
    return b


def fixed_config(path: str, m: int, n: int, k: int, group_width: int) -> dict:
    """The config used without autotuning: block sizes, split-K and warps for one call."""
    bk = _pow2_divisor(group_width, 64 if interpreting() else 128)
    if path == "decode":
        bn = 32
        tiles_n, k_blocks = _cdiv(n, bn), _cdiv(k, bk)
        target = 4 if interpreting() else 512  # programs wanted to fill the GPU
        split = 1
        while split * 2 <= k_blocks and tiles_n * split * 2 <= target and split < 16:
            split *= 2
        return {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4}
    if path == "gemm":
        big = not interpreting() and m >= 128
        return {"BLOCK_M": 64 if big else 32, "BLOCK_N": 64 if big else 32, "BLOCK_K": min(bk, 64 if big else 32),
                "GROUP_M": 8, "num_warps": 4}
    return {"BLOCK_N": 32 if interpreting() else 64, "BLOCK_K": bk, "num_warps": 4}


def validate(x, packed, scale, zero_point, g_idx, bias, n: int, k: int, bits: int, group_width: int) -> int:
    """Check every input against the packed layout; return the zero-point mode (0 none, 1 packed int, 2 float).

    Raises:
        ValueError: naming the offending tensor and the fix.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: the packed layout holds 1 to 8 bits per code")
    if n < 1 or k < 1:
        raise ValueError(f"weight shape ({n}, {k}) is empty: weight_shape must be positive")
    if not 1 <= group_width <= k:
        raise ValueError(f"group_width={group_width} must be in [1, K={k}] (K for per-channel)")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x has dtype {x.dtype}: use float16, bfloat16 or float32 activations")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the weight has K={k} input features: "
            f"the last dimension of x must be {k}"
        )
    words = -(-k * bits // 32)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"weight_packed must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if tuple(packed.shape) != (n, words):
        raise ValueError(
            f"weight_packed has shape {tuple(packed.shape)}, expected ({n}, {words}) for weight_shape "
            f"({n}, {k}) at {bits} bits: K is misaligned with the packing; weight_shape, bits and "
            f"weight_packed must come from the same export"
        )
    groups = -(-k // group_width)
    if scale.dtype not in _FLOATS or tuple(scale.shape) != (n, groups):
        raise ValueError(
            f"weight_scale must be a float (N, G) = ({n}, {groups}) tensor for group width {group_width}, "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    zp_mode = 0
    if zero_point is not None:
        if zero_point.dtype == torch.int32:
            zp_mode, want = 1, (-(-n * bits // 32), groups)
        elif zero_point.dtype == scale.dtype:
            zp_mode, want = 2, (n, groups)
        else:
            raise ValueError(
                f"weight_zero_point has dtype {zero_point.dtype}: use int32 packed codes, or a float offset "
                f"in the scale's dtype ({scale.dtype}) for zero_point='float' schemes"
            )
        if tuple(zero_point.shape) != want:
            raise ValueError(f"weight_zero_point has shape {tuple(zero_point.shape)}, expected {want}")
    if g_idx is not None:
        if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (k,):
            raise ValueError(f"g_idx must be an integer ({k},) tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
        if not _capturing() and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(f"g_idx values must lie in [0, {groups}): the activation-order index is corrupt")
    if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (n,)):
        raise ValueError(f"bias must be a float ({n},) tensor, got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (x, packed, scale, zero_point, g_idx, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"inputs are on several devices {sorted(map(str, devices))}: move them to one device")
    return zp_mode


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's split-K workspace: fp32 zeros (>= ``floats``) and int32 zero counters (>= ``counters``).

    The decode kernel leaves both zeroed, so one pair serves every call on the
    device (calls on one stream at a time). It grows on demand, which is not
    allowed while a CUDA graph is captured: run the largest shape eagerly first.
    """
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < counters:
        if _capturing():
            raise RuntimeError(
                "the Triton decode kernel's workspace must grow, which cannot happen inside CUDA graph capture "
                "or torch.compile tracing: run one eager call with the largest shape on this device first"
            )
        floats = max(floats, DECODE_MAX_M * counters, 0 if ws is None else ws.numel())
        counters = max(counters, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(counters, dtype=torch.int32, device=device)
        _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


def _capturing() -> bool:
    """Inside CUDA graph capture or torch.compile tracing, where a host sync is not allowed."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _common(packed, scale, zero_point, g_idx, n, k, bits, group_width, zp_mode):
    """Pointer arguments, strides and constexprs shared by the three kernels."""
    z = zero_point if zero_point is not None else scale  # any valid pointer; unused when ZP_MODE == 0
    g = g_idx if g_idx is not None else packed
    ptrs = (packed, scale, z, g)
    sizes = (packed.shape[1], z.shape[0] if zp_mode == 1 else 0)
    strides = (packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1), z.stride(0), z.stride(1))
    consts = {"BITS": bits, "GROUP_W": group_width, "ONE_GROUP": group_width >= k,
              "HAS_GIDX": g_idx is not None, "ZP_MODE": zp_mode}
    return ptrs, sizes, strides, consts


def dequantize(packed, scale, zero_point, g_idx, n: int, k: int, bits: int, group_width: int,
               dtype: torch.dtype, *, zp_mode: int | None = None, config: dict | None = None) -> torch.Tensor:
    """(N, K) weight in ``dtype`` from the packed layout (computed in the scale's dtype, then cast)."""
    if zp_mode is None:
        probe = torch.empty(0, k, dtype=dtype, device=packed.device)
        zp_mode = validate(probe, packed, scale, zero_point, g_idx, None, n, k, bits, group_width)
    cfg = dict(config or fixed_config("dequant", 0, n, k, group_width))
    ptrs, sizes, strides, consts = _common(packed, scale, zero_point, g_idx, n, k, bits, group_width, zp_mode)
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    warps = cfg.pop("num_warps", 4)
    grid = (_cdiv(n, cfg["BLOCK_N"]), _cdiv(k, cfg["BLOCK_K"]))
    kernels.dequant_kernel[grid](*ptrs, out, n, k, *sizes, *strides, out.stride(0), **consts, **cfg, num_warps=warps)
    return out


def dequant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    bias: torch.Tensor | None,
    n: int,
    k: int,
    bits: int,
    group_width: int,
    *,
    path: str = "auto",
    autotune: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` with Triton.

    Args:
        x: (..., K) float16 / bfloat16 / float32.
        packed: int32 (N, ceil(K*bits/32)), codes LSB-first offset by 2^(bits-1).
        scale: (N, G) float, G = ceil(K / group_width).
        zero_point: int32 (ceil(N*bits/32), G) packed along dim 0; a float (N, G)
            offset in the scale's dtype for ``zero_point="float"`` schemes
            (``w = (q - qmin) * scale + offset``); or None (symmetric).
        g_idx: optional int (K,) group of each column (activation order).
        bias: optional (N,).
        n, k: the weight shape; bits: 1-8; group_width: columns per group (K for per-channel).
        path: ``auto``, ``decode``, ``gemm`` or ``dequant``.
        autotune: use ``triton.autotune`` (ignored under the interpreter).
        config: explicit block sizes for the chosen path (bypasses autotuning).

    Returns:
        (..., N) in ``x.dtype``, fp32 accumulation.
    """
    if path not in PATHS:
        raise ValueError(f"path={path!r} is unknown: use one of {PATHS}")
    zp_mode = validate(x, packed, scale, zero_point, g_idx, bias, n, k, bits, group_width)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    path = select_path(m) if path == "auto" else path
    if path == "dequant":
        w = dequantize(packed, scale, zero_point, g_idx, n, k, bits, group_width, x.dtype,
                       zp_mode=zp_mode, config=config)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    tune = autotune and config is None and not interpreting()
    if path == "decode" and m > DECODE_MAX_M:
        raise ValueError(f"path='decode' handles at most {DECODE_MAX_M} rows, got M={m}: use 'gemm' or 'auto'")
    ptrs, sizes, strides, consts = _common(packed, scale, zero_point, g_idx, n, k, bits, group_width, zp_mode)
    consts |= {"HAS_BIAS": bias is not None, "DOT_F32": interpreting() or x.dtype == torch.float32}
    b = bias.to(x.dtype) if bias is not None else scale  # rounded to x's dtype, as the reference does
    shape_args = (m, n, k, *sizes, _m_bucket(m), x2.stride(0), x2.stride(1), *strides)
    if path == "decode":
        block_m = 1 if m == 1 else DECODE_MAX_M
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        ws, counters = _workspace(x.device, m * n, n)
        args = (x2, *ptrs, b, out, ws, counters, *shape_args, out.stride(0))
        if tune:
            def grid(meta):
                return (_cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

            kernels.decode_tuned[grid](*args, **consts, BLOCK_M=block_m)
        else:
            cfg = dict(config or fixed_config("decode", m, n, k, group_width))
            warps = cfg.pop("num_warps", 4)
            grid = (_cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
            kernels.decode_kernel[grid](*args, **consts, BLOCK_M=block_m, **cfg, num_warps=warps)
        return out.reshape(*lead, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = (x2, *ptrs, b, out, *shape_args, out.stride(0))
    if tune:
        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

        kernels.gemm_tuned[grid](*args, **consts)
    else:
        cfg = dict(config or fixed_config("gemm", m, n, k, group_width))
        warps = cfg.pop("num_warps", 4)
        grid = (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]),)
        kernels.gemm_kernel[grid](*args, **consts, **cfg, num_warps=warps)
    return out.reshape(*lead, n)
