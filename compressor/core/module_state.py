"""What a compressed module carries beyond its weights, as a protocol the engine can save and restore blindly.

Each kind of state (a pruning mask, quantization parameters) says how to describe
itself as JSON, which tensors it keeps outside ``state_dict`` and how to put itself
back on a fresh module. :class:`compressor.pipeline.checkpoint.BlockCheckpoint` walks
:data:`STATE_KINDS` without knowing which pass wrote what; a new kind of state is
one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compressor.core.arch import GATE_UP_DOWN
from compressor.core.scheme import QuantScheme
from compressor.core.sparsity import MASK_SUFFIX, SparsityInfo, is_pruned
from compressor.core.state import EXPERT_SUFFIXES, QUANT_BUFFERS, is_experts_quantized, is_quantized

__all__ = ["StateKind", "STATE_KINDS"]


@dataclass(frozen=True)
class StateKind:
    """One kind of module state.

    Attributes:
        key: its entry in a checkpoint's metadata (``{module name: description}``).
        describe: the module's state as JSON-ready data, or None when the module has none.
        extra_tensors: tensors the state keeps outside ``state_dict`` (non-persistent buffers), by buffer name.
        buffers: buffer names the state adds to a module (restored by :attr:`restore`, not by ``load_state_dict``).
        restore: puts the state back: ``restore(module, description, tensors, device)``; ``tensors`` holds the
            saved tensors of :attr:`buffers` that were found.
    """

    key: str
    describe: Callable[[nn.Module], dict | None]
    extra_tensors: Callable[[nn.Module], dict[str, torch.Tensor]]
    buffers: tuple[str, ...]
    restore: Callable[[nn.Module, dict, dict[str, torch.Tensor], torch.device], None]


def _restore_sparsity(module: nn.Module, info: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    module.sparsity_info = SparsityInfo(**info)
    for name, mask in tensors.items():  # weight_mask, or a fused-experts module's {param}_mask
        module.register_buffer(name, mask.to(device), persistent=False)


def _scheme_restorer(attribute: str) -> Callable[[nn.Module, dict, dict[str, torch.Tensor], torch.device], None]:
    """A ``restore`` that sets the module's scheme ``attribute`` and registers the saved qparam buffers."""

    def restore(module: nn.Module, scheme: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        setattr(module, attribute, QuantScheme(**scheme))
        for name, tensor in tensors.items():
            module.register_buffer(name, tensor.to(device))

    return restore


def _mask_tensor(module: nn.Module) -> dict[str, torch.Tensor]:
    # the mask itself, not weight != 0: after quantization some kept weights round to zero
    if not is_pruned(module):
        return {}
    return {name: b.detach().cpu().contiguous() for name, b in module._buffers.items()
            if name in _MASK_BUFFERS and b is not None}


_MASK_BUFFERS = ("weight_mask",) + tuple(p + MASK_SUFFIX for p, _ in GATE_UP_DOWN.params)


# restored in this order: a pruned module's mask before its quantization parameters
STATE_KINDS: tuple[StateKind, ...] = (
    StateKind("pruned", lambda m: vars(m.sparsity_info) if is_pruned(m) else None, _mask_tensor, _MASK_BUFFERS,
              _restore_sparsity),
    StateKind("schemes", lambda m: m.quant_scheme.to_dict() if is_quantized(m) else None, lambda m: {},
              QUANT_BUFFERS, _scheme_restorer("quant_scheme")),
    StateKind("expert_schemes", lambda m: m.experts_scheme.to_dict() if is_experts_quantized(m) else None,
              lambda m: {}, tuple(p + s for p, _ in GATE_UP_DOWN.params for s in EXPERT_SUFFIXES),
              _scheme_restorer("experts_scheme")),
)
