"""Quantizable layers seen as matrices: the (N, K) weight view of Linear, HF Conv1D and
Conv2d, and convolutions evaluated at sampled output positions as row products."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QUANTIZABLE", "conv_positions", "conv_rows", "is_quantizable", "layer_view", "rows_forward"]

QUANTIZABLE = "nn.Linear, transformers Conv1D and nn.Conv2d"


def is_quantizable(module: nn.Module) -> bool:
    """Whether :func:`layer_view` handles ``module``."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or type(module).__name__ == "Conv1D"


def conv_rows(x: torch.Tensor, conv: nn.Conv2d, positions: torch.Tensor) -> torch.Tensor:
    """Receptive-field patches of ``conv`` at flat output positions.

    Args:
        x: (N, C, H, W) conv input (the conv's own zero padding is applied here).
        conv: the layer (kernel, stride, dilation, groups; ``padding_mode="zeros"``).
        positions: (P,) int64 indices into the flattened (N, Ho, Wo) output grid.

    Returns:
        (P, G, C/G*kh*kw) rows such that output channel ``o`` of group ``g`` at
        that position is ``rows[:, g] @ W_view[o]`` (+ bias), with ``W_view``
        the (O, C/G*kh*kw) flattened weight (see :func:`rows_forward`).
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"adaround: Conv2d padding={conv.padding!r} padding_mode={conv.padding_mode!r} is not supported; "
                         "use numeric zero padding (or an explicit padding module before the conv)")
    ho, wo = _output_size(x, conv)
    ph, pw = conv.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    c = x.shape[1]
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    positions = positions.to(x.device)
    img, rest = positions // (ho * wo), positions % (ho * wo)
    ys = (rest // wo)[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh  # (P, kh)
    xs = (rest % wo)[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw  # (P, kw)
    chans = torch.arange(c, device=x.device)
    patches = x[img[:, None, None, None], chans[None, :, None, None], ys[:, None, :, None], xs[:, None, None, :]]
    return patches.reshape(positions.shape[0], conv.groups, (c // conv.groups) * kh * kw)


def _output_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    """(Ho, Wo) of ``conv`` on input (N, C, H, W), its zero padding included."""
    _, _, h, w = x.shape
    (ph, pw), (kh, kw), (sh, sw), (dh, dw) = conv.padding, conv.kernel_size, conv.stride, conv.dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def conv_positions(x: torch.Tensor, conv: nn.Conv2d) -> int:
    """Number of output positions (N * Ho * Wo) of ``conv`` on input (N, C, H, W)."""
    ho, wo = _output_size(x, conv)
    return x.shape[0] * ho * wo


def rows_forward(rows: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Conv outputs at sampled positions: rows (P, G, Kg) and weight view (O, Kg) → (P, O)."""
    g = rows.shape[1]
    o = w.shape[0]
    if g == 1:
        out = rows[:, 0] @ w.t()
    elif o == g:  # depthwise: one output channel per group
        out = (rows * w[None]).sum(-1)
    else:
        out = torch.bmm(rows.transpose(0, 1), w.reshape(g, o // g, -1).transpose(1, 2))  # (G, P, O/G)
        out = out.transpose(0, 1).reshape(rows.shape[0], o)
    return out if bias is None else out + bias


def layer_view(module: nn.Module) -> tuple[torch.Tensor, Callable, Callable]:
    """Quantization view of a layer's weight and the matching forward.

    Returns:
        ``(W (N, K), forward(x, w_view) → output, to_weight(w_view) → module-shaped weight)``.
        Linear: W as is. HF ``Conv1D`` (weight (K, N)): transposed. ``Conv2d``
        (O, I/g, kh, kw): flattened to (O, I/g*kh*kw), groups along the flattened input.
    """
    w = module.weight.detach()
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float()
    if isinstance(module, nn.Linear):
        return w, lambda x, v: F.linear(x, v, bias), lambda v: v
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W (K, N)
        return w.t(), lambda x, v: F.linear(x, v, bias), lambda v: v.t().contiguous()
    if isinstance(module, nn.Conv2d):
        shape = w.shape

        def conv(x, v):
            return F.conv2d(x, v.reshape(shape), bias, module.stride, module.padding, module.dilation, module.groups)

        return w.reshape(shape[0], -1), conv, lambda v: v.reshape(shape)
    raise ValueError(f"adaround supports nn.Linear, Conv1D and nn.Conv2d, not {type(module).__name__}")
