"""Pruning state carried by a pruned ``nn.Linear`` between passes.

The analogue of :mod:`compressor.core.state`. Fused MoE experts (3-D parameters
``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) are pruned per expert and keep
one mask per parameter, ``{param}_mask`` (E, N, K) (:func:`attach_expert_masks`). A pruned module keeps its
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

__all__ = ["SparsityInfo", "attach_mask", "is_pruned", "prune_mask", "MASK_SUFFIX", "attach_expert_masks",
           "expert_mask", "pruned_zeros"]

MASK_SUFFIX = "_mask"  # fused experts: buffer ``{param}_mask`` (E, N, K) bool beside each pruned parameter


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


def attach_expert_masks(module: nn.Module, masks: dict[str, torch.Tensor], method: str, structure: str) -> None:
    """Record per-expert masks on a fused-experts module and zero the pruned weights in place.

    Args:
        module: the fused-experts module; each ``masks`` key names one of its 3-D parameters.
        masks: parameter name → (E, N, K) bool, True = kept.
        method: the pruning method.
        structure: ``"unstructured"`` or ``"N:M"``.

    Raises:
        ValueError: a mask that does not fit its parameter.
    """
    kept = total = 0
    for pname, mask in masks.items():
        param = getattr(module, pname)
        if mask.shape != param.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not fit {pname} {tuple(param.shape)}")
        mask = mask.detach().to(device=param.device, dtype=torch.bool)
        with torch.no_grad():
            for e in range(param.shape[0]):  # in place, one expert at a time: no second copy of the experts
                param.data[e].masked_fill_(~mask[e], 0)
        module.register_buffer(pname + MASK_SUFFIX, mask.clone(), persistent=False)
        kept += int(mask.sum())
        total += mask.numel()
    module.sparsity_info = SparsityInfo(method, structure, 1.0 - kept / max(total, 1))


def expert_mask(module: nn.Module, pname: str, expert: int) -> torch.Tensor | None:
    """(N, K) bool mask of expert ``expert``'s matrix in fused parameter ``pname`` (True = kept), or None when
    the module was not pruned (falls back to ``!= 0`` when the buffer is gone)."""
    if not is_pruned(module):
        return None
    mask = module._buffers.get(pname + MASK_SUFFIX)
    return mask[expert] if mask is not None else getattr(module, pname)[expert] != 0


def pruned_zeros(module: nn.Module) -> int:
    """How many weights of a pruned module (a linear or fused experts) its masks remove."""
    if not is_pruned(module):
        return 0
    masks = [b for n, b in module._buffers.items() if n.endswith(MASK_SUFFIX) and n != "weight_mask"]
    if masks:
        return sum(int((~m).sum()) for m in masks)
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return int((~prune_mask(module)).sum())
    return sum(int((p == 0).sum()) for p in module.parameters(recurse=False) if p.ndim == 3)  # experts, no buffers
