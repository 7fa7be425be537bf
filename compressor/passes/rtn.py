"""Round-to-nearest weight quantization pass (no calibration data)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from compressor.core.layers import QUANTIZABLE, is_quantizable, layer_view
from compressor.core.passes import Pass, PassConfig, register_pass, select_modules
from compressor.core.progress import progress
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant
from compressor.core.sparsity import prune_mask
from compressor.core.state import attach_qparams

__all__ = ["RTNConfig", "RTNPass", "rtn_quantize_module"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RTNConfig(PassConfig):
    """Round-to-nearest: per-group scale and zero point from the observer, then round.

    Attributes:
        scheme: the weight scheme (bits, group size, symmetry, observer).
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)


def rtn_quantize_module(module: nn.Module, scheme: QuantScheme) -> None:
    """Quantize ``module.weight`` in place to the nearest grid point.

    The groups run along the input of the layer's (N, K) view (:func:`layer_view`):
    a Conv2d (O, I/g, kh, kw) is quantized as (O, I/g*kh*kw).
    A pruned layer (:func:`compressor.core.sparsity.prune_mask`) keeps its zeros.
    """
    w, _, to_weight = layer_view(module)
    keep = prune_mask(module)
    if keep is not None:
        if scheme.float_zero_point:
            raise ValueError("a pruned layer needs a grid with an exact zero: use symmetric or zero_point='int'")
        w = w.masked_fill(~keep, 0)
    qp = compute_qparams(w.float(), scheme)
    qp = type(qp)(qp.scale.to(w.dtype), None if qp.zero_point is None else qp.zero_point.to(w.dtype))
    # a zero weight quantizes to the zero point (or 0), which dequantizes to exactly 0: masks survive
    attach_qparams(module, scheme, qp, to_weight(fake_quant(w, qp, scheme)))


@register_pass
class RTNPass(Pass):
    """Quantize every targeted layer (nn.Linear, HF Conv1D, nn.Conv2d) with round-to-nearest."""

    name = "rtn"
    config_cls = RTNConfig
    weight_pass = "quantize"

    def apply(self, model: nn.Module, *, quiet: bool = False, only: set[str] | None = None, **context) -> None:
        """Quantize the targeted layers of ``model`` (restricted to names in ``only`` when given)."""
        layers = [(n, m) for n, m in select_modules(model, self.config)
                  if is_quantizable(m) and (only is None or n in only)]
        if not layers and only is None:
            raise ValueError(
                f"rtn: no {QUANTIZABLE} layer matches targets={list(self.config.targets)} "
                f"ignore={list(self.config.ignore)}; check the module names with `compressor inspect`"
            )
        log.info("rtn: %s on %d layers", self.config.scheme.describe(), len(layers))
        self._quantize(layers, quiet)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Quantize the targeted layers inside one block (sequential pipeline)."""
        self._quantize([(n, m) for n, m in select_modules(block, self.config, prefix) if is_quantizable(m)], True)

    def _quantize(self, layers: list[tuple[str, nn.Module]], quiet: bool) -> None:
        for name, module in progress(layers, "rtn", quiet=quiet):
            try:
                rtn_quantize_module(module, self.config.scheme)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
