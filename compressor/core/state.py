"""Quantization state carried by a compressed ``nn.Linear`` between passes and export.

A quantized module keeps its ``weight`` parameter holding the dequantized
(on-grid) values, so the model runs unchanged, and gains:

* ``weight_scale`` buffer (N, G), ``weight_zero_point`` buffer (N, G) or absent,
  ``weight_global_scale`` float32 (1,) for NVFP4 (:class:`compressor.core.scheme.QParams`),
  ``weight_g_idx`` buffer (K,) int32 when columns were reordered (actorder);
* ``quant_scheme`` attribute, the :class:`QuantScheme`.

Export re-derives the integer codes from the weight and checks that the
weight is exactly on its grid.

A fused-experts module (:func:`compressor.core.arch.experts_layout`) keeps its
3-D parameters, each expert's (N, K) matrix on its own grid, and gains per
quantized parameter ``P`` a ``P_scale`` buffer (E, N, G) and a
``P_zero_point`` buffer (E, N, G) or none, plus the ``experts_scheme``
attribute (:func:`attach_expert_qparams`).

A linear quantized into a llama.cpp block format (the ``gguf`` pass) keeps its
dequantized ``weight`` and gains the ``gguf_tensor`` attribute,
``(format name, block parameters)`` (:func:`attach_gguf`), which the GGUF
writer encodes as is.

A linear the ``allocate_bits`` pass gave its own width carries the ``allocated_bits`` attribute,
``(bits, group_size)``, until a quantization pass applies it (:func:`allocated_scheme`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compressor.core import gguf_blocks
from compressor.core.scheme import QParams, QuantScheme

__all__ = ["attach_qparams", "quant_state", "is_quantized", "QUANT_BUFFERS", "attach_expert_qparams",
           "experts_quant_state", "is_experts_quantized", "EXPERT_SUFFIXES", "attach_gguf", "gguf_state",
           "ALLOCATED_BITS", "allocated_scheme"]

QUANT_BUFFERS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")  # what attach_qparams adds beside the weight
EXPERT_SUFFIXES = ("_scale", "_zero_point", "_global_scale")  # what attach_expert_qparams adds beside each fused parameter
ALLOCATED_BITS = "allocated_bits"  # (bits, group_size) set by the allocate_bits pass


def allocated_scheme(module: nn.Module, scheme: QuantScheme, name: str = "") -> QuantScheme:
    """The scheme a quantization pass applies to ``module``: its own ``scheme``, with ``bits`` and ``group_size``
    replaced by the ``allocate_bits`` pass's choice when that pass planned this module.

    Raises:
        ValueError: an allocation meets a float scheme (the allocation chooses integer widths).
    """
    choice = getattr(module, ALLOCATED_BITS, None)
    if choice is None:
        return scheme
    if scheme.is_float:
        raise ValueError(f"{name or type(module).__name__}: allocate_bits chose W{choice[0]} for it, but the "
                         f"quantization pass's scheme is {scheme.describe()}: allocate_bits mixes integer widths, "
                         "so give the quantization pass an integer scheme")
    return dataclasses.replace(scheme, bits=choice[0], group_size=choice[1])


def attach_qparams(
    module: nn.Module,
    scheme: QuantScheme,
    qp: QParams,
    weight: torch.Tensor,
    g_idx: torch.Tensor | None = None,
) -> None:
    """Store a quantized weight and its parameters on ``module`` (in place).

    Args:
        module: the layer; its ``weight`` data is replaced by ``weight``.
        scheme: the scheme used.
        qp: scale and zero point, (N, G).
        weight: (N, K) dequantized weight, same dtype as the module's weight.
        g_idx: optional (K,) group of each column.
    """
    # a new Parameter (not .data) so a weight tied to another module (lm_head ↔
    # embeddings) is untied instead of silently quantized in both places
    old = module.weight
    module.weight = nn.Parameter(weight.detach().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    for name in QUANT_BUFFERS:
        if name in module._buffers:
            del module._buffers[name]
    module.register_buffer("weight_scale", qp.scale.detach().clone())
    if qp.zero_point is not None:
        module.register_buffer("weight_zero_point", qp.zero_point.detach().clone())
    if qp.global_scale is not None:
        module.register_buffer("weight_global_scale", qp.global_scale.detach().clone())
    if g_idx is not None:
        module.register_buffer("weight_g_idx", g_idx.detach().to(torch.int32).clone())
    module.quant_scheme = scheme


def is_quantized(module: nn.Module) -> bool:
    """Whether :func:`attach_qparams` was applied to ``module``."""
    return isinstance(getattr(module, "quant_scheme", None), QuantScheme)


def quant_state(module: nn.Module) -> tuple[QuantScheme, QParams, torch.Tensor | None] | None:
    """``(scheme, qparams, g_idx)`` of a quantized module, or None."""
    if not is_quantized(module):
        return None
    zp = module._buffers.get("weight_zero_point")
    qp = QParams(module.weight_scale, zp, module._buffers.get("weight_global_scale"))
    return module.quant_scheme, qp, module._buffers.get("weight_g_idx")


def attach_expert_qparams(module: nn.Module, param: str, scheme: QuantScheme, qp: QParams) -> None:
    """Record the quantization parameters of one fused-experts parameter (its values were already rounded in place).

    Args:
        module: the fused-experts module.
        param: the parameter's name (``gate_up_proj``); its (E, N, K) data holds each expert's dequantized matrix.
        scheme: the scheme every expert of every quantized parameter of the module uses.
        qp: scale and zero point, (E, N, G).

    Raises:
        ValueError: another parameter of the module was quantized with a different scheme.
    """
    old = getattr(module, "experts_scheme", None)
    if old is not None and old != scheme:
        raise ValueError(f"{param}: the module's experts were already quantized with {old.describe()}, "
                         f"not {scheme.describe()}: one scheme per experts module")
    for suffix in EXPERT_SUFFIXES:
        module._buffers.pop(param + suffix, None)
    module.register_buffer(param + "_scale", qp.scale.detach().clone())
    if qp.zero_point is not None:
        module.register_buffer(param + "_zero_point", qp.zero_point.detach().clone())
    if qp.global_scale is not None:
        module.register_buffer(param + "_global_scale", qp.global_scale.detach().clone())
    module.experts_scheme = scheme


def is_experts_quantized(module: nn.Module) -> bool:
    """Whether :func:`attach_expert_qparams` was applied to ``module``."""
    return isinstance(getattr(module, "experts_scheme", None), QuantScheme)


def experts_quant_state(module: nn.Module) -> tuple[QuantScheme, dict[str, QParams]] | None:
    """``(scheme, {parameter name: qparams (E, N, G)})`` of a quantized fused-experts module, or None."""
    if not is_experts_quantized(module):
        return None
    params = {}
    for name in dict(module.named_parameters(recurse=False)):
        scale = module._buffers.get(name + "_scale")
        if scale is not None:
            params[name] = QParams(scale, module._buffers.get(name + "_zero_point"),
                                   module._buffers.get(name + "_global_scale"))
    return module.experts_scheme, params


def attach_gguf(module: nn.Module, fmt: gguf_blocks.BlockFormat, params: gguf_blocks.Params) -> None:
    """Store a linear's llama.cpp block parameters and put its weight on their grid (in place).

    Args:
        module: the ``nn.Linear``; its ``weight`` becomes the (N, K) dequantized weight in its own dtype (a new
            Parameter, so a tied weight is untied rather than changed in both places).
        fmt: the block format.
        params: its parameters for the (N, K) weight.
    """
    old = module.weight
    weight = gguf_blocks.dequantize(fmt, params).to(old.dtype).to(old.device)
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=old.requires_grad)
    module.gguf_tensor = (fmt.name, params)


def gguf_state(module: nn.Module) -> tuple[gguf_blocks.BlockFormat, gguf_blocks.Params] | None:
    """``(format, parameters)`` of a linear :func:`attach_gguf` quantized, or None."""
    state = getattr(module, "gguf_tensor", None)
    if state is None:
        return None
    return gguf_blocks.FORMATS[state[0]], state[1]
