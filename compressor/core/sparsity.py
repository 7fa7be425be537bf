"""Pruning state carried by a pruned ``nn.Linear`` between passes.

The analogue of :mod:`compressor.core.state`. A pruned module keeps its
``weight`` parameter, with exact zeros where pruned, and gains:

* ``weight_mask`` non-persistent buffer (N, K) bool, True = kept. Non-persistent
  so it stays out of ``state_dict`` (block checkpoints and exports are
  unchanged); it moves with the module between devices. It costs one byte per
  weight while the model is in memory;
* ``sparsity_info`` attribute, a :class:`SparsityInfo` (method and structure).

A later pass (quantization) reads the mask with :func:`prune_mask` to keep
pruned weights at zero; when the buffer is gone (e.g. a block restored from a
checkpoint) the mask falls back to ``weight != 0``, which keeps every N:M
constraint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SparsityInfo", "attach_mask", "is_pruned", "prune_mask"]


@dataclass(frozen=True)
class SparsityInfo:
    """How a module was pruned.

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        structure: ``"unstructured"`` or ``"N:M"`` (N kept of every M).
        sparsity: fraction of the module's weights that are pruned (measured from the mask).
    """

    method: str
    structure: str
    sparsity: float


def attach_mask(module: nn.Module, weight: torch.Tensor, mask: torch.Tensor, method: str, structure: str) -> None:
    """Store a pruned weight and its mask on ``module`` (in place).

    Args:
        module: the layer; its ``weight`` becomes ``weight * mask`` in the module's dtype.
        weight: (N, K) pruned weight (any float dtype).
        mask: (N, K) bool, True = kept.
        method: the pruning method.
        structure: ``"unstructured"`` or ``"N:M"``.
    """
    old = module.weight
    if mask.shape != old.shape or weight.shape != old.shape:
        raise ValueError(f"mask {tuple(mask.shape)} / weight {tuple(weight.shape)} do not fit the module's {tuple(old.shape)}")
    mask = mask.detach().to(device=old.device, dtype=torch.bool)
    new = weight.detach().to(old.device, old.dtype).masked_fill(~mask, 0)
    # a new Parameter (not .data) so a weight tied to another module is untied instead of pruned twice
    module.weight = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
    if "weight_mask" in module._buffers:
        del module._buffers["weight_mask"]
    module.register_buffer("weight_mask", mask.clone(), persistent=False)
    module.sparsity_info = SparsityInfo(method, structure, 1.0 - mask.float().mean().item())


def is_pruned(module: nn.Module) -> bool:
    """Whether :func:`attach_mask` was applied to ``module``."""
    return isinstance(getattr(module, "sparsity_info", None), SparsityInfo)


def prune_mask(module: nn.Module) -> torch.Tensor | None:
    """(N, K) bool mask of a pruned module (True = kept), or None when not pruned."""
    if not is_pruned(module):
        return None
    mask = module._buffers.get("weight_mask")
    return mask if mask is not None else module.weight != 0
