"""Fold batch normalisation into the convolution that feeds it, before quantizing a CNN.

A deployed integer CNN runs ``conv`` with BN already folded in, so its
weights are ``W * gamma / sqrt(var + eps)`` per output channel; quantizing
the unfolded weight would quantize a tensor that never ships. Folding also
matters to data-driven rounding: the reconstruction error of the folded conv
is the error after BN, so channels that BN amplifies weigh more (AdaRound
and BRECQ fold BN before learning the rounding).

Pairs are found by running the model once: a ``BatchNorm2d`` whose input is
the very tensor a ``Conv2d`` just produced (nothing in between) is folded into
that conv and replaced by ``nn.Identity``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["fold_batchnorm"]

log = logging.getLogger(__name__)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, str]]:
    """Fold every ``Conv2d → BatchNorm2d`` pair of ``model`` in place (eval-mode semantics).

    The conv's weight (O, I/g, kh, kw) is scaled by ``s = gamma / sqrt(running_var + eps)``
    per output channel and its bias becomes ``s * (bias - running_mean) + beta``
    (created when the conv had none); the BN module is replaced by ``nn.Identity``.
    Outputs in eval mode are unchanged up to float rounding.

    Args:
        model: the model (any module whose forward takes ``example_input``).
        example_input: one batch, e.g. (1, 3, 224, 224) float32, used to trace which
            BN consumes which conv's output.

    Returns:
        ``(conv name, bn name)`` of each folded pair, in forward order.

    Raises:
        ValueError: the model is in training mode (BN would use batch statistics),
            or a BN without running statistics feeds from a conv.
    """
    if model.training:
        raise ValueError("fold_batchnorm folds running statistics: call model.eval() first")
    calls: list[tuple[str, nn.Module, int, int]] = []  # (name, module, input ptr, output ptr)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, m, args[0].data_ptr(), out.data_ptr()))))
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
    pairs, seen = [], set()
    for (cname, conv, _, out_ptr), (bname, bn, in_ptr, _) in zip(calls, calls[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and out_ptr == in_ptr and bname not in seen:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"{bname} keeps no running statistics and cannot be folded into {cname}")
            pairs.append((cname, conv, bname, bn))
            seen.add(bname)
    modules = dict(model.named_modules())
    for cname, conv, bname, bn in pairs:
        s = (bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        dtype = conv.weight.dtype
        conv.weight = nn.Parameter((conv.weight.float() * s.float()[:, None, None, None]).to(dtype), conv.weight.requires_grad)
        conv.bias = nn.Parameter(((bias.float() - bn.running_mean.float()) * s.float() + beta.float()).to(dtype))
        parent, _, child = bname.rpartition(".")
        setattr(modules[parent] if parent else model, child, nn.Identity())
    log.info("folded %d BatchNorm2d layers into their convolutions", len(pairs))
    return [(c, b) for c, _, b, _ in pairs]
