"""``torch.library`` custom op around the Triton dequant-matmul, with a fake (meta) implementation.

``torch.ops.compressor.dequant_matmul`` is opaque to ``torch.compile`` (the fake
implementation gives it shapes) and safe inside CUDA graphs (no host sync; the
``g_idx`` range check is skipped while capturing or compiling). Importing this
module registers the op; it needs triton.
"""

from __future__ import annotations

import torch

from compressor.kernels.triton import launch

__all__ = ["dequant_matmul"]


@torch.library.custom_op("compressor::dequant_matmul", mutates_args=())
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
    path: str = "auto",
    autotune: bool = True,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` by the Triton kernels: x (..., K) → (..., N) in ``x.dtype``.

    Arguments as :func:`compressor.kernels.triton.launch.dequant_matmul`
    (packed int32 (N, ceil(K*bits/32)), scale (N, G), zero_point packed int32
    (ceil(N*bits/32), G) / float (N, G) / None, g_idx int (K,) or None, bias (N,) or None).
    """
    return launch.dequant_matmul(x, packed, scale, zero_point, g_idx, bias, n, k, bits, group_width,
                                 path=path, autotune=autotune)


@dequant_matmul.register_fake
def _(x, packed, scale, zero_point, g_idx, bias, n, k, bits, group_width, path="auto", autotune=True):
    if x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight has K={k} input features")
    return x.new_empty(*x.shape[:-1], n)
