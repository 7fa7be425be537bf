"""Host side of the float-format dequant-matmul (:mod:`compressor.kernels.triton.float_kernels`): checks, launch."""

from __future__ import annotations

import torch

from compressor.core.scheme import QuantScheme
from compressor.kernels.environment import interpreting
from compressor.kernels.triton import float_kernels

__all__ = ["float_dequant_matmul", "float_format_id"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def float_format_id(scheme: QuantScheme) -> int:
    """The kernel's ``FMT`` of a float scheme: 0 FP8 (float scales), 1 NVFP4 (E4M3 scales), 2 MXFP4 (E8M0).

    Raises:
        ValueError: a scheme that is none of them.
    """
    if scheme.is_float and scheme.bits == 8 and scheme.scale_format == "float":
        return float_kernels.FMT_FP8
    if scheme.is_float and scheme.bits == 4 and scheme.scale_format == "e4m3":
        return float_kernels.FMT_NVFP4
    if scheme.is_float and scheme.bits == 4 and scheme.scale_format == "e8m0":
        return float_kernels.FMT_MXFP4
    raise ValueError(f"{scheme.describe()}: the float kernel runs FP8 with float scales, NVFP4 and MXFP4")


def float_dequant_matmul(x: torch.Tensor, stored: dict[str, torch.Tensor], scheme: QuantScheme, n: int, k: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T (+ bias)`` with W in its stored float layout, decoded inside the kernel.

    Args:
        x: (..., K) float16 / bfloat16 / float32 on the weight's device.
        stored: the layer's tensors by compressed-tensors name (:meth:`FloatQuantLinear.stored`): FP8 ``weight``
            float8_e4m3fn (N, K) and ``weight_scale`` (N, G); NVFP4 ``weight_packed`` uint8 (N, K/2),
            ``weight_scale`` float8_e4m3fn (N, K/16), ``weight_global_scale`` float32 (1,); MXFP4
            ``weight_packed`` and ``weight_scale`` uint8 (N, K/32).
        scheme: the float scheme.
        n, k: the weight's shape.
        bias: (N,) or None.

    Returns:
        (..., N) in x's dtype.

    Raises:
        ValueError: a tensor that does not fit the layout, naming it.
    """
    fmt = float_format_id(scheme)
    if x.dtype not in _FLOATS or x.shape[-1] != k:
        raise ValueError(f"x must be float16 / bfloat16 / float32 with K={k} features, got {x.dtype} {tuple(x.shape)}")
    width = scheme.group_width(k)
    groups = -(-k // width)
    rows = n
    if fmt == float_kernels.FMT_FP8:
        codes, scale = stored["weight"], stored["weight_scale"]
        want = (n, k)
        rows = scheme.scale_rows(n)
        if codes.dtype != torch.float8_e4m3fn or scale.dtype not in _FLOATS:
            raise ValueError(f"FP8 weight must be float8_e4m3fn with float scales, got {codes.dtype} / {scale.dtype}")
    else:
        codes, scale = stored["weight_packed"], stored["weight_scale"]
        want = (n, -(-k // 2))
        if codes.dtype != torch.uint8:
            raise ValueError(f"weight_packed must be uint8 (two FP4 codes a byte), got {codes.dtype}")
    if scheme.per_tensor:
        rows, groups = 1, 1
        scale = scale.reshape(1, 1)
    if tuple(codes.shape) != want or tuple(scale.shape) != (rows, groups):
        raise ValueError(f"stored weight {tuple(codes.shape)} / scale {tuple(scale.shape)} do not fit weight ({n}, {k}) "
                         f"at group width {width}: expected {want} / ({rows}, {groups})")
    gs = stored.get("weight_global_scale") if fmt == float_kernels.FMT_NVFP4 else None
    if fmt == float_kernels.FMT_NVFP4 and (gs is None or gs.numel() != 1):
        raise ValueError("NVFP4 needs its (1,) float32 weight_global_scale")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    w8 = codes.view(torch.uint8).contiguous()
    s = scale.view(torch.uint8) if scale.dtype == torch.float8_e4m3fn else scale
    s = s.contiguous()
    if scheme.per_tensor:  # one scale: every row reads it (stride 0), no row blocks
        s = s.expand(n, groups)
    gs_t = (gs if gs is not None else torch.ones(1, device=x.device)).to(torch.float32).contiguous()
    b = bias.contiguous() if bias is not None else out  # a dummy pointer when there is no bias
    interp = interpreting()
    block_m = 16 if m <= 16 else (32 if interp else 64)
    block_n = 32 if interp else 64
    # a K tile inside one group reads one scale per row: the largest power of two <= 64 dividing the group
    block_k = next((b for b in (64, 32, 16) if width % b == 0), 32 if interp else 64)
    grid = (-(-m // block_m), -(-n // block_n))
    float_kernels.float_gemm_kernel[grid](
        x2, w8, s, gs_t, b, out, m, n, k,
        x2.stride(0), x2.stride(1), w8.stride(0), w8.stride(1), s.stride(0), s.stride(1), out.stride(0), out.stride(1),
        FMT=fmt, GROUP_W=width, HAS_BIAS=bias is not None, DOT_F32=x.dtype == torch.float32 or interp,
        ROW_BLOCK=1 if scheme.per_tensor else scheme.block_rows or 1,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4 if interp else 8,  # 8: no spills on sm_90
    )
    return out.reshape(*lead, n)
