"""Students that keep their compression while they are distilled.

* **Quantized** linears (after RTN / GPTQ / AdaRound, or unpacked from an
  export by :func:`trainable_from_export`) train a latent float weight through a
  straight-through estimator: the forward sees ``fake_quant(latent)`` on the
  layer's own grid (scale, zero point, ``g_idx`` fixed), the gradient passes to
  the latent unchanged. :meth:`StudentState.finish` snaps the weights back onto
  the grid, so the export path is the usual one.
* **Pruned** linears keep their mask: pruned weights are zero in every forward
  and are reset to zero after every optimizer step.
* **Smaller** models: :func:`drop_layers` removes whole decoder blocks (or
  load a ``prune_structured`` checkpoint as the student).
* **Fused MoE experts** (3-D ``gate_up_proj`` / ``down_proj``) get the same per fused
  parameter: each expert's matrix is fake-quantized on its own grid ((E, N, G)
  qparams) and keeps its mask. The experts module's forward indexes the parameter
  once per expert, so it runs inside ``parametrize.cached()``: the (E, N, K)
  fake-quant is computed once per forward, not once per expert.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.core.arch import experts_layout, find_blocks
from compressor.core.scheme import QParams, QuantScheme, fake_quant
from compressor.core.sparsity import MASK_SUFFIX, is_pruned, prune_mask
from compressor.core.state import (
    attach_expert_qparams,
    attach_qparams,
    experts_quant_state,
    is_experts_quantized,
    is_quantized,
    quant_state,
)

__all__ = ["StudentState", "drop_layers", "prepare_student", "trainable_from_export"]

log = logging.getLogger(__name__)


class _FakeQuantSTE(nn.Module):
    """Parametrization ``latent -> fake_quant(latent) * mask`` with a straight-through gradient."""

    def __init__(self, scheme: QuantScheme, qp: QParams, g_idx: torch.Tensor | None, mask: torch.Tensor | None):
        super().__init__()
        self.scheme = scheme
        self.register_buffer("scale", qp.scale.detach().clone())
        self.register_buffer("zero_point", None if qp.zero_point is None else qp.zero_point.detach().clone())
        self.register_buffer("global_scale", None if qp.global_scale is None else qp.global_scale.detach().clone())
        self.register_buffer("g_idx", None if g_idx is None else g_idx.detach().clone())
        self.register_buffer("mask", None if mask is None else mask.detach().clone())

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        q = fake_quant(latent, QParams(self.scale, self.zero_point, self.global_scale), self.scheme, self.g_idx)
        out = latent + (q - latent).detach()  # value on the grid, gradient of the identity
        return out if self.mask is None else out * self.mask


class _FakeQuantExpertsSTE(nn.Module):
    """Parametrization of a fused-experts parameter: ``latent (E, N, K) -> fake_quant(latent) * mask`` per expert
    (qparams (E, N, G)), with a straight-through gradient."""

    def __init__(self, scheme: QuantScheme, qp: QParams, mask: torch.Tensor | None):
        super().__init__()
        self.scheme = scheme
        self.register_buffer("scale", qp.scale.detach().clone())
        self.register_buffer("zero_point", None if qp.zero_point is None else qp.zero_point.detach().clone())
        self.register_buffer("mask", None if mask is None else mask.detach().clone())

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        e, n, k = latent.shape
        flat = lambda t: None if t is None else t.reshape(e * n, -1)  # noqa: E731  rows are independent
        q = fake_quant(latent.reshape(e * n, k), QParams(flat(self.scale), flat(self.zero_point)), self.scheme)
        out = latent + (q.reshape(e, n, k) - latent).detach()
        return out if self.mask is None else out * self.mask


def _cached_forward(module: nn.Module, *args, **kwargs):
    """An experts module's forward with its parametrized weights computed once for the whole call."""
    with parametrize.cached():
        return type(module).forward(module, *args, **kwargs)


@dataclass
class StudentState:
    """The compression a student carries into training, and how to restore it afterwards.

    Attributes:
        quantized: (module, scheme, qparams, g_idx) of every parametrized quantized linear.
        pruned: (module, mask) of every pruned linear that is not quantized.
    """

    quantized: list[tuple[nn.Module, QuantScheme, QParams, torch.Tensor | None]] = field(default_factory=list)
    pruned: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)
    # fused experts: (module, scheme, {param: qparams (E, N, G)}) and (module, {param: (E, N, K) mask})
    quantized_experts: list[tuple[nn.Module, QuantScheme, dict[str, QParams]]] = field(default_factory=list)
    pruned_experts: list[tuple[nn.Module, dict[str, torch.Tensor]]] = field(default_factory=list)

    @torch.no_grad()
    def after_step(self) -> None:
        """Put pruned weights back to exactly zero (the optimizer's momentum moves them)."""
        for module, mask in self.pruned:
            module.weight.mul_(mask.to(module.weight.dtype))
        for module, masks in self.pruned_experts:
            for pname, mask in masks.items():
                getattr(module, pname).mul_(mask.to(getattr(module, pname).dtype))

    @torch.no_grad()
    def finish(self) -> None:
        """Snap quantized weights onto their grid, remove the parametrizations, re-attach the quantization state."""
        for module, scheme, qp, g_idx in self.quantized:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            attach_qparams(module, scheme, qp, module.weight.detach(), g_idx)
        self.quantized.clear()
        for module, scheme, qps in self.quantized_experts:
            for pname, qp in qps.items():
                if parametrize.is_parametrized(module, pname):
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
                attach_expert_qparams(module, pname, scheme, qp)
            module.__dict__.pop("forward", None)
        self.quantized_experts.clear()


def prepare_student(student: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None) -> StudentState:
    """Make a compressed model trainable without losing its compression.

    Quantized ``nn.Linear`` layers get a straight-through fake-quant
    parametrization of their weight (latent initialised at the on-grid weight);
    pruned ones are recorded for :meth:`StudentState.after_step`. Every
    parameter is set trainable.

    Args:
        student: the model (changed in place).
        modules: restrict to these ``(name, module)``; default: all.

    Raises:
        ValueError: the model still holds packed ``QuantLinear`` layers (unpack
            them with :func:`trainable_from_export`), or quantized layers that
            are not ``nn.Linear``.
    """
    from compressor.runtime.float_linear import FloatQuantLinear
    from compressor.runtime.quant_linear import QuantLinear

    state = StudentState()
    for name, m in modules if modules is not None else student.named_modules():
        if isinstance(m, (QuantLinear, FloatQuantLinear)):
            raise ValueError(f"{name} is a packed {type(m).__name__}: call "
                             "compressor.algorithms.distill.students.trainable_from_export(model) before distilling it")
        if experts_layout(m) is not None and (is_experts_quantized(m) or is_pruned(m)):
            _prepare_experts(name, m, state)
            continue
        mask = prune_mask(m) if is_pruned(m) else None
        if is_quantized(m):
            if not isinstance(m, nn.Linear):
                raise ValueError(f"{name}: only quantized nn.Linear layers can be distilled, not {type(m).__name__}")
            scheme, qp, g_idx = quant_state(m)
            parametrize.register_parametrization(m, "weight", _FakeQuantSTE(scheme, qp, g_idx, mask))
            state.quantized.append((m, scheme, qp, g_idx))
        elif mask is not None:
            state.pruned.append((m, mask))
    student.requires_grad_(True)
    log.info("student: %d quantized linears (straight-through), %d pruned linears (masks fixed), %d quantized and "
             "%d pruned fused-experts modules", len(state.quantized), len(state.pruned), len(state.quantized_experts),
             len(state.pruned_experts))
    return state


def _prepare_experts(name: str, module: nn.Module, state: StudentState) -> None:
    """Parametrize a quantized fused-experts module's parameters (per-expert STE), or record its masks."""
    masks = {p: module._buffers[p + MASK_SUFFIX] for p, _ in experts_layout(module).params
             if is_pruned(module) and module._buffers.get(p + MASK_SUFFIX) is not None}
    found = experts_quant_state(module)
    if found is None:
        state.pruned_experts.append((module, masks))
        return
    scheme, qps = found
    if any(qp.global_scale is not None for qp in qps.values()):
        raise ValueError(f"{name}: experts with a per-matrix global scale cannot be distilled yet")
    for pname, qp in qps.items():
        parametrize.register_parametrization(module, pname, _FakeQuantExpertsSTE(scheme, qp, masks.get(pname)))
    module.forward = partial(_cached_forward, module)  # instance attribute: finish() removes it
    state.quantized_experts.append((module, scheme, dict(qps)))


def trainable_from_export(model: nn.Module) -> nn.Module:
    """Replace every packed ``QuantLinear`` of a loaded export by an ``nn.Linear`` carrying its quantization state.

    The new layer holds the dequantized weight plus ``weight_scale`` /
    ``weight_zero_point`` / ``weight_g_idx`` buffers and the scheme, exactly as
    a quantization pass leaves a layer, so :func:`prepare_student` can train it
    and :func:`compressor.export.compressed_tensors.save_compressed` re-packs it.
    Exact zeros of the weight are kept as a pruning mask.

    Returns:
        ``model``, changed in place.
    """
    from compressor.core.pack import unpack
    from compressor.core.sparsity import attach_mask
    from compressor.runtime.float_linear import FloatQuantLinear
    from compressor.runtime.quant_linear import QuantLinear

    for name, q in list(model.named_modules()):
        if isinstance(q, FloatQuantLinear):
            w = q.dequantized_weight()
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=w.dtype)
            if q.bias is not None:
                lin.bias = nn.Parameter(q.bias.detach().clone())
            attach_qparams(lin, q.scheme, q.qparams(), w)
            model.set_submodule(name, lin)
            continue
        if not isinstance(q, QuantLinear):
            continue
        w = q.dequantized_weight()
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=w.dtype)
        lin.weight = nn.Parameter(w.clone())
        if q.bias is not None:
            lin.bias = nn.Parameter(q.bias.detach().clone())
        zp = None if q.weight_zero_point is None else unpack(q.weight_zero_point, q.scheme.bits, q.out_features, dim=0)
        qp = QParams(q.weight_scale.detach().clone(), None if zp is None else zp.to(q.weight_scale.dtype))
        attach_qparams(lin, q.scheme, qp, w, q.weight_g_idx)
        zeros = w == 0
        if zeros.float().mean() > 0.25:  # a pruned layer (a dense one has a few exact zeros at most)
            attach_mask(lin, w, ~zeros, "loaded", "unstructured")
        model.set_submodule(name, lin)
    return model


def drop_layers(model: nn.Module, drop: Iterable[int]) -> nn.Module:
    """Remove decoder blocks ``drop`` (indices) and update the config: a smaller student.

    Remaining blocks are renumbered (``layer_idx`` of their attention, used by
    the KV cache) and ``config.num_hidden_layers`` (and ``layer_types`` when
    present) follow.

    Returns:
        ``model``, changed in place.
    """
    name, blocks = find_blocks(model)
    drop = sorted(set(int(i) for i in drop))
    if not drop:
        return model
    if drop[0] < 0 or drop[-1] >= len(blocks):
        raise ValueError(f"drop={drop}: block indices must be in [0, {len(blocks)})")
    if len(drop) == len(blocks):
        raise ValueError("dropping every block leaves no model: keep at least one")
    keep = [i for i in range(len(blocks)) if i not in drop]
    model.set_submodule(name, nn.ModuleList([blocks[i] for i in keep]))
    _, new_blocks = find_blocks(model)
    for j, block in enumerate(new_blocks):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    log.info("dropped blocks %s: %d remain", drop, len(keep))
    return model
