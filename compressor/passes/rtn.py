"""Round-to-nearest weight quantization pass (no calibration data)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.core.arch import experts_layout, fused_groups
from compressor.core.layers import QUANTIZABLE, is_quantizable, layer_view
from compressor.core.passes import Pass, PassConfig, register_pass, select_modules
from compressor.core.progress import progress
from compressor.core.scheme import (
    QParams,
    QuantScheme,
    cast_params,
    compute_qparams,
    fake_quant,
    shared_global_scales,
)
from compressor.core.sparsity import expert_mask, prune_mask
from compressor.core.state import allocated_scheme, attach_expert_qparams, attach_qparams

__all__ = ["RTNConfig", "RTNPass", "rtn_quantize_module", "rtn_quantize_experts", "round_matrix",
           "stack_qparams", "quantize_experts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RTNConfig(PassConfig):
    """Round-to-nearest: per-group scale and zero point from the observer, then round.

    Attributes:
        scheme: the weight scheme (bits, group size, symmetry, observer).
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)


def rtn_quantize_module(module: nn.Module, scheme: QuantScheme, gscale: torch.Tensor | None = None) -> None:
    """Quantize ``module.weight`` in place to the nearest grid point.

    The groups run along the input of the layer's (N, K) view (:func:`layer_view`):
    a Conv2d (O, I/g, kh, kw) is quantized as (O, I/g*kh*kw).
    A pruned layer (:func:`compressor.core.sparsity.prune_mask`) keeps its zeros. ``gscale``: NVFP4's global
    scale when it is shared with fused siblings (:func:`compressor.core.scheme.shared_global_scales`).
    """
    w, _, to_weight = layer_view(module)
    keep = prune_mask(module)
    if keep is not None:
        if scheme.float_zero_point:
            raise ValueError("a pruned layer needs a grid with an exact zero: use symmetric or zero_point='int'")
        w = w.masked_fill(~keep, 0)
    # a zero weight quantizes to the zero point (or 0), which dequantizes to exactly 0: masks survive
    rounded, qp = round_matrix(w, scheme, gscale)
    attach_qparams(module, scheme, qp, to_weight(rounded))


def rtn_quantize_experts(module: nn.Module, scheme: QuantScheme) -> None:
    """Quantize every expert of a fused-experts module in place, each projection as its own (N, K) matrix.

    Each fused parameter (E, N, K) (:func:`compressor.core.arch.experts_layout`) is
    rounded one expert at a time into its own storage, so no second full-precision
    copy of the experts is made. Scales and zero points are per row and group, so
    rounding ``gate_up_proj[e]`` (2I, H) at once gives exactly what rounding
    ``gate_proj`` and ``up_proj`` separately would.

    Raises:
        ValueError: the module's layout is not known, or the scheme has a float zero point.
    """
    layout = experts_layout(module)
    if layout is None:
        raise ValueError(f"{type(module).__name__}: unknown fused-experts layout (see compressor.core.arch.experts_layout)")
    if scheme.float_zero_point:
        raise ValueError("fused experts need zero_point='int' or a symmetric scheme")
    def solve(pname: str, e: int, w: torch.Tensor) -> tuple[torch.Tensor, QParams]:
        keep = expert_mask(module, pname, e)  # a pruned expert keeps its zeros
        return round_matrix(w if keep is None else w.masked_fill(~keep, 0), scheme)

    quantize_experts(module, scheme, solve)


def quantize_experts(module: nn.Module, scheme: QuantScheme,
                     solve: Callable[[str, int, torch.Tensor], tuple[torch.Tensor, QParams]],
                     params: tuple[str, ...] | None = None) -> None:
    """Replace each expert's matrix of every fused parameter of a known layout by ``solve``'s, in place, one expert
    at a time, and record the stacked qparams (:func:`compressor.core.state.attach_expert_qparams`).

    Args:
        module: a fused-experts module (:func:`compressor.core.arch.experts_layout` not None).
        scheme: the scheme ``solve`` quantizes to.
        solve: ``(parameter name, expert, (N, K) weight) -> (dequantized (N, K), qparams (N, G))``.
        params: the fused parameters to quantize, in this order (default: all, in layout order).

    NVFP4: ``solve`` sees one expert's fused matrix at a time, so each expert's gate and up projections (one
    ``gate_up_proj`` slice) share a global scale and its down projection has its own, as vLLM's fused-MoE
    loader wants them (it keeps one global scale per expert for the fused gate / up GEMM).
    """
    for pname in params or [p for p, _ in experts_layout(module).params]:
        param = getattr(module, pname)
        qps = []
        with torch.no_grad():
            for e in range(param.shape[0]):
                w = param.data[e]
                new, qp = solve(pname, e, w)
                w.copy_(new)
                qps.append(qp)
        attach_expert_qparams(module, pname, scheme, stack_qparams(qps))


def round_matrix(w: torch.Tensor, scheme: QuantScheme, gscale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, QParams]:
    """Round an (N, K) matrix to its nearest grid point: ``(dequantized (N, K), qparams (N, G))`` in ``w``'s dtype
    (``gscale``: a shared NVFP4 global scale instead of the matrix's own)."""
    qp = cast_params(compute_qparams(w.float(), scheme, gscale=gscale), scheme, w.dtype)
    return fake_quant(w, qp, scheme), qp


def stack_qparams(qps: list[QParams]) -> QParams:
    """E per-expert (N, G) qparams → one (E, N, G)."""
    zp = None if qps[0].zero_point is None else torch.stack([q.zero_point for q in qps])
    gs = None if qps[0].global_scale is None else torch.stack([q.global_scale for q in qps])
    return QParams(torch.stack([q.scale for q in qps]), zp, gs)


@register_pass
class RTNPass(Pass):
    """Quantize every targeted layer (nn.Linear, HF Conv1D, nn.Conv2d, fused MoE experts) with round-to-nearest."""

    name = "rtn"
    config_cls = RTNConfig
    weight_pass = "quantize"
    streams = True

    def compressible(self, module: nn.Module) -> bool:
        """Layers and fused-experts modules of a known layout."""
        return is_quantizable(module) or experts_layout(module) is not None

    def apply(self, model: nn.Module, *, quiet: bool = False, only: set[str] | None = None, **context) -> None:
        """Quantize the targeted layers of ``model`` (restricted to names in ``only`` when given)."""
        layers = [(n, m) for n, m in select_modules(model, self.config)
                  if self.compressible(m) and (only is None or n in only)]
        if not layers and only is None:
            raise ValueError(
                f"rtn: no {QUANTIZABLE} layer matches targets={list(self.config.targets)} "
                f"ignore={list(self.config.ignore)}; check the module names with `compressor inspect`"
            )
        experts = sum(not is_quantizable(m) for _, m in layers)
        log.info("rtn: %s on %d layers%s", self.config.scheme.describe(), len(layers) - experts,
                 f" and {experts} fused-experts modules" if experts else "")
        self._quantize(layers, quiet)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Quantize the targeted layers inside one block (sequential pipeline)."""
        self._quantize([(n, m) for n, m in select_modules(block, self.config, prefix) if self.compressible(m)], True)

    def _quantize(self, layers: list[tuple[str, nn.Module]], quiet: bool) -> None:
        scheme = self.config.scheme
        gscales = shared_global_scales({n: layer_view(m)[0] for n, m in layers if is_quantizable(m)},
                                       fused_groups([n for n, _ in layers]), scheme)
        for name, module in progress(layers, "rtn", quiet=quiet):
            try:
                if is_quantizable(module):
                    rtn_quantize_module(module, allocated_scheme(module, scheme, name), gscales.get(name))
                else:
                    rtn_quantize_experts(module, self.config.scheme)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
