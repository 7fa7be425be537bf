"""The ``gguf`` pass: each linear of a decoder block into the llama.cpp block format its mix gives it, with
codes chosen by GPTQ on that format's grid.

llama.cpp's own ``llama-quantize`` rounds every weight to its nearest grid point (with an imatrix, after an
importance-weighted search of each block's scale). This pass makes the same two choices llama.cpp does, the
format per tensor (:func:`compressor.core.gguf_blocks.mix_format`, e.g. Q4_K_M) and each block's scales
(:func:`~compressor.core.gguf_blocks.choose`, weighted by the diagonal of the layer's input Hessian, which is
the imatrix), then lets GPTQ pick the codes on that fixed grid
(:func:`compressor.algorithms.quant.gptq.gptq_on_grid`), so the rounding error of each column is fed back
into the columns not yet rounded. The GGUF writer (:func:`compressor.export.gguf.save_gguf`) stores the
result bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compressor.algorithms.quant.gptq import gptq_on_grid, refit_scales
from compressor.core import gguf_blocks
from compressor.core.arch import GGUF_TENSOR_NAMES, DecoderLayout, block_config, head_counts, layout_of_config
from compressor.core.passes import PassConfig, register_pass
from compressor.core.scheme import QParams, QuantScheme
from compressor.core.state import attach_gguf
from compressor.passes.gptq import GPTQPass, check_sweep_options

__all__ = ["GGUFConfig", "GGUFPass", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("gptq", "nearest")


@dataclass(frozen=True, kw_only=True)
class GGUFConfig(PassConfig):
    """Quantization into llama.cpp's block formats.

    Attributes:
        mix: llama-quantize's mix (:data:`compressor.core.gguf_blocks.MIXES` but ``F32``): which format
            each tensor gets.
        method: ``"gptq"`` (codes by GPTQ on the fixed grid) or ``"nearest"`` (nearest codes: what
            llama-quantize does, for comparison).
        importance: search each block's scale weighting each column by its mean squared input (the Hessian's
            diagonal, llama.cpp's imatrix); off: every weight alike.
        dampening: GPTQ's fraction of the mean Hessian diagonal added to the diagonal.
        block_size: GPTQ's lazy-update block width (columns).
        actorder: GPTQ processes columns by decreasing Hessian diagonal (the grid stays fixed either way).
        asymmetric: GPTAQ's asymmetric calibration (see :class:`compressor.passes.gptq.GPTQConfig`).
        asymmetric_weight: its ``alpha``.
        refit_scales: after GPTQ, re-solve the block scales of the formats whose offset is tied to the scale
            (Q8_0, Q4_0, Q5_0, Q6_K) by least squares on the layer output, for the codes chosen
            (:func:`compressor.algorithms.quant.gptq.refit_scales`), then round them to the format; a row keeps
            its old scales unless the stored ones lower its output error.
    """

    mix: str = "Q4_K_M"
    method: str = "gptq"
    importance: bool = True
    dampening: float = 0.01
    block_size: int = 128
    actorder: bool = True
    asymmetric: bool = False
    asymmetric_weight: float = 0.25
    refit_scales: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mix not in gguf_blocks.MIXES or self.mix == "F32":
            raise ValueError(f"gguf mix={self.mix!r}: use one of {[m for m in gguf_blocks.MIXES if m != 'F32']} "
                             "(an unquantized GGUF needs no pass: compressor.export.gguf.save_gguf(mix='F32'))")
        if self.method not in METHODS:
            raise ValueError(f"gguf method={self.method!r}: use one of {METHODS}")
        check_sweep_options(self.block_size, self.dampening)


@register_pass
class GGUFPass(GPTQPass):
    """Collect each linear's input Hessian block by block, then quantize it into its llama.cpp block format."""

    name = "gguf"
    config_cls = GGUFConfig
    weight_pass = "quantize"
    requires_calibration = True
    streams = False  # a GGUF file is written from the whole model (compressor.export.gguf)

    def __init__(self, config: GGUFConfig):
        super().__init__(config)
        self._block_roles: dict[str, str] = {}  # the current block's linears -> llama.cpp role (begin_block)

    def compressible(self, module: nn.Module) -> bool:
        """Linears only: llama.cpp's MoE tensors are not written by this exporter yet."""
        return isinstance(module, nn.Linear)

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Name the block's linears as llama.cpp does (refusing one it has no name for), then register the
        Hessian hooks (:meth:`GPTQPass.begin_block`)."""
        self._block_roles = self._roles(block, prefix)
        return super().begin_block(block, prefix)

    def _roles(self, block: nn.Module, prefix: str) -> dict[str, str]:
        """``{module name: llama.cpp tensor role}`` of the block's targeted linears.

        Raises:
            ValueError: the family has no layout, or a targeted linear has no GGUF name.
        """
        layout = layout_of_config(block_config(block), "gguf", kind="GGUF tensor")
        by_id = {id(m): GGUF_TENSOR_NAMES[k] for k, m in layout.modules(block, prefix, DecoderLayout.LINEARS).items()}
        roles = {}
        for name, module in self.block_modules(block, prefix):
            if not isinstance(module, nn.Linear):
                continue
            if id(module) not in by_id:
                raise ValueError(f"gguf: {name} is not one of the linears llama.cpp names in a block "
                                 f"({sorted(set(by_id.values()))}); add it to the pass's ignore to keep it out")
            roles[name] = by_id[id(module)]
        return roles

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Quantize the block's linears into their formats from the collected Hessians."""
        c = self.config
        self._inputs.close()
        modules = dict(self.block_modules(block, prefix))
        roles = self._block_roles
        layer = int(prefix.rsplit(".", 1)[-1])
        config = block_config(block)
        n_layers = int(config.num_hidden_layers)
        n_heads, n_kv, _ = head_counts(config)
        for name, acc in self._inputs.stats.items():
            module = modules[name]
            w = module.weight.data.float()
            fmt = gguf_blocks.mix_format(c.mix, roles[name], layer, n_layers, w.shape[1], gqa=n_heads // n_kv)
            H = acc.H
            try:
                params = gguf_blocks.choose(fmt, w.cpu(), H.diagonal().cpu() if c.importance else None)
                if c.method == "gptq":
                    codes, loss = gptq_on_grid(w, H, _to(gguf_blocks.grid(fmt, params), w.device),
                                               block_size=c.block_size, dampening=c.dampening, actorder=c.actorder,
                                               cross=acc.C, cross_weight=c.asymmetric_weight)
                    params = gguf_blocks.with_codes(fmt, params, codes.cpu())
                    if c.refit_scales and fmt.name in _CENTRE:
                        params = _refit(fmt, params, w.cpu(), H.cpu())
                    log.debug("gguf %s %s loss %.4g", name, fmt.name, loss)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            attach_gguf(module, fmt, params)
        self._inputs.clear()
        self._fp.clear()


def _to(g: gguf_blocks.Grid, device) -> gguf_blocks.Grid:
    return gguf_blocks.Grid(g.step.to(device), g.offset.to(device), g.qmin, g.qmax, g.width)


_CENTRE = {"Q8_0": 0, "Q4_0": 8, "Q5_0": 16, "Q6_K": 32}  # formats whose weight is step * (q - centre): linear in the step


def _refit(fmt: gguf_blocks.BlockFormat, params: gguf_blocks.Params, w: torch.Tensor,
           H: torch.Tensor) -> gguf_blocks.Params:
    """Least-squares block scales for fixed codes (formats of :data:`_CENTRE`), rounded as the format stores
    them; each row keeps whichever of its old and new stored scales gives the lower output error."""
    g = gguf_blocks.grid(fmt, params)
    n, k = w.shape
    codes = params.q.reshape(n, k).long()
    sign = torch.where(g.step < 0, -1.0, 1.0)  # signed scales (Q5_0, Q6_K): solve for magnitudes
    cols = torch.arange(k) // g.width
    signed_codes = (codes - _CENTRE[fmt.name]) * sign[:, cols]
    scheme = QuantScheme(bits=8, group_size=g.width, symmetric=False)
    zero = torch.zeros_like(g.step)
    qp = refit_scales(w, signed_codes + 128, QParams(g.step.abs(), zero + 128), scheme, H)
    step = qp.scale * sign
    if fmt is gguf_blocks.Q6_K:
        rows = step.reshape(n, -1, 16)
        d = (rows.abs().amax(-1) / 127 * (1 + 2.0**-10)).to(torch.float16)
        scales = torch.round(rows / torch.where(d == 0, 1, d.float())[..., None]).clamp(-127, 127)
        new = gguf_blocks.Q6KParams(d, scales.to(torch.int8), params.q)
    else:
        d = step.to(torch.float16).reshape(params.d.shape)
        new = type(params)(d, params.q)

    def err(p):
        e = gguf_blocks.dequantize(fmt, p) - w
        return ((e @ H) * e).sum(1)

    better = err(new) < err(params)
    keep = lambda a, b: torch.where(better.reshape(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
    if fmt is gguf_blocks.Q6_K:
        return gguf_blocks.Q6KParams(keep(new.d, params.d), keep(new.scales, params.scales), params.q)
    return type(params)(keep(new.d, params.d), params.q)
