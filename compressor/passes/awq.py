"""The ``awq`` pass: activation-aware per-channel weight scaling, folded into the producer of each input, before a
weight pass (:mod:`compressor.algorithms.quant.awq`).

Per decoder block it observes the inputs of four sites and, for each, searches AWQ's scaling exponent on the
output error of the linears that read it, then folds the scales in (the full-precision function is unchanged):

* ``attn_norm`` → q, k, v: the norm's weight divided by ``s``, the three weights' columns multiplied;
* v → o (when v's outputs are o's inputs one to one: no grouped-query sharing): v's rows and bias divided;
* ``mlp_norm`` → gate, up;
* up → down: up's rows and bias divided.

The pass changes weights only; the weight pass after it (``rtn``, ``gptq``, ``adaround``) quantizes them, and
should use the ``scheme`` given here. A site whose readers are not all among the pass's targets is left alone.

With ``inputs: nvfp4`` (or another float input format of ``quantize_activations``) the linear inputs are to be
quantized as well: the pass keeps a sample of each site's input tokens and searches the exponent on the readers'
output error with inputs and weights both rounded (SmoothQuant's migration with AWQ's search), for W4A4 / W8A8
recipes that put ``quantize_activations: {format: nvfp4, bits: 4}`` after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.algorithms.hessian import HessianAccumulator
from compressor.algorithms.quant.awq import STATISTICS, search_scales
from compressor.core.arch import DecoderLayout, block_config, head_counts, layout_of_config
from compressor.core.fake_quant import check_activation_format
from compressor.core.passes import Pass, PassConfig, register_pass
from compressor.core.scheme import QuantScheme
from compressor.core.state import allocated_scheme

__all__ = ["AWQConfig", "AWQPass"]

log = logging.getLogger(__name__)

# (producer, readers): the producer's output is the readers' input
SITES = (("attn_norm", ("q", "k", "v")), ("v", ("o",)), ("mlp_norm", ("gate", "up")), ("up", ("down",)))


@dataclass(frozen=True, kw_only=True)
class AWQConfig(PassConfig):
    """Activation-aware weight scaling before a weight pass.

    Attributes:
        scheme: the weight grid the scales are searched for: the scheme of the weight pass that follows.
        grid: steps of the scaling exponent alpha between 0 (no scaling) and 1.
        duo_scaling: scales ``mean|x|^alpha / mean|w|^(1 - alpha)`` instead of ``mean|x|^alpha``
            (llm-compressor's default).
        inputs: None (weight-only: the search weighs the weight's rounding alone) or the float format the
            linear inputs are quantized to by a later ``quantize_activations`` pass (``"nvfp4"``, ``"mxfp4"``,
            ``"fp8"``, ``"fp8-block"``, ``"fp8-static"``): the search then measures the output error with both
            rounded, on ``samples`` input tokens per site.
        samples: input tokens kept per site for that search (a uniform sample of the calibration tokens).
        statistic: what the scales are a power of: ``"mean"`` (AWQ: each channel's mean |x|; with
            ``duo_scaling`` over the weight columns' mean max-normalised |w|) or ``"max"`` (SmoothQuant: each
            channel's largest |x| over the calibration tokens; with ``duo_scaling`` over the weight columns'
            largest |w|, SmoothQuant's ``max|x|^alpha / max|w|^(1 - alpha)``).
        grouped_v: under grouped-query attention (fewer key/value heads than query heads) also scale v -> o:
            each of v's rows feeds o's inputs of every query head in its group, so those inputs share the
            row's scale (statistics pooled over them). False skips that site, as AutoAWQ and llm-compressor do.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    grid: int = 20
    duo_scaling: bool = False
    inputs: str | None = None
    samples: int = 4096
    statistic: str = "mean"
    grouped_v: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"awq.grid={self.grid!r}: use a positive number of alpha steps, e.g. 20")
        if not isinstance(self.duo_scaling, bool):
            raise ValueError(f"awq.duo_scaling must be true or false, got {self.duo_scaling!r}")
        if self.inputs is not None:
            check_activation_format(self.inputs, what="awq.inputs")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"awq.samples={self.samples!r}: use a positive number of input tokens, e.g. 4096")
        if not isinstance(self.grouped_v, bool):
            raise ValueError(f"awq.grouped_v must be true or false, got {self.grouped_v!r}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"awq.statistic={self.statistic!r}: use one of {', '.join(STATISTICS)}")


class _InputStats:
    """GPTQ's running ``H = 2/n sum x x^T`` (K, K) (:class:`HessianAccumulator`), ``mean |x|`` and ``max |x|``
    (K,) of one input, float32; with ``samples`` also a uniform sample of at most that many input tokens (T, K) float32
    (reservoir sampling, seeded: the same calibration data gives the same sample)."""

    def __init__(self, k: int, device: torch.device, samples: int = 0):
        self.hessian = HessianAccumulator(k, device)
        self.abs_sum = torch.zeros(k, device=device)
        self.abs_max = torch.zeros(k, device=device)
        self.samples = samples
        self.sample = torch.empty(0, k, device=device)
        self._seen = 0
        self._gen = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.hessian.add(x)  # refuses non-finite inputs
        rows = x.reshape(-1, x.shape[-1]).float()
        magnitude = rows.abs()
        self.abs_sum += magnitude.sum(dim=0)
        torch.maximum(self.abs_max, magnitude.amax(dim=0), out=self.abs_max)
        if self.samples:
            self._keep(rows)

    def _keep(self, rows: torch.Tensor) -> None:
        """Reservoir sampling (Vitter's algorithm R): every token seen so far is in the sample with equal chance."""
        room = self.samples - self.sample.shape[0]
        if room > 0:
            self.sample = torch.cat([self.sample, rows[:room]])
            self._seen += min(room, rows.shape[0])
            rows = rows[room:]
        if rows.shape[0] == 0:
            return
        index = self._seen + torch.arange(rows.shape[0], dtype=torch.float64)  # each row's 0-based position
        slot = (torch.rand(rows.shape[0], generator=self._gen, dtype=torch.float64) * (index + 1)).long()
        take = slot < self.samples
        at, rows = slot[take], rows[take.to(rows.device)]
        # a slot drawn twice in this batch keeps its later row, as one row at a time would
        pos = torch.arange(at.shape[0])
        last = torch.full((self.samples,), -1, dtype=torch.long).scatter_reduce(0, at, pos, reduce="amax")
        keep = last[at] == pos
        self.sample[at[keep].to(self.sample.device)] = rows[keep.to(rows.device)]
        self._seen += take.shape[0]

    @property
    def n(self) -> int:
        return self.hessian.n

    @property
    def H(self) -> torch.Tensor:
        return self.hessian.H

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


@register_pass
class AWQPass(Pass):
    """Search and fold AWQ's per-channel scales, block by block (see the module docstring)."""

    name = "awq"
    config_cls = AWQConfig
    requires_calibration = True
    streams = True  # every site's producer and readers lie in one block

    def __init__(self, config: AWQConfig):
        super().__init__(config)
        # (site, producer, readers, tie: the producer channel of each reader input, None when one to one)
        self._sites: list[tuple[str, nn.Module, list[tuple[str, nn.Module]], torch.Tensor | None]] = []
        self._stats: dict[str, _InputStats] = {}
        self._handles: list = []
        self.report: list[dict[str, Any]] = []

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Hook the first reader of every site whose readers are all targeted; returns them.

        Raises:
            ValueError: the family has no layout, or one with features AWQ does not fold into yet (a norm
                scaling by ``1 + w``, sandwich norms, fused q/k/v or gate/up, MoE experts).
        """
        layout = layout_of_config(block_config(block), "awq", kind="AWQ scaling")
        mods = layout.modules(block, prefix, DecoderLayout.BLOCK)
        targeted = {id(m) for _, m in self.block_modules(block, prefix)}
        names = {id(m): f"{prefix}.{getattr(layout, k)}" for k, m in mods.items()}
        self._sites = []
        for producer, readers in SITES:
            found = [(names[id(mods[r])], mods[r]) for r in readers]
            if not all(id(m) in targeted for _, m in found):
                continue
            prod, tie = mods[producer], None
            if producer == "v" and prod.out_features != mods["o"].in_features:
                tie = _v_rows_of_o_inputs(block_config(block), prod, mods["o"]) if self.config.grouped_v else None
                if tie is None:
                    log.debug("awq %s: v -> o skipped: grouped-query attention shares v's rows across heads%s",
                              prefix, "" if self.config.grouped_v else " (grouped_v: true scales it)")
                    continue
            self._sites.append((names[id(prod)], prod, found, tie))
        observed = []
        for site, _, readers, _ in self._sites:
            name, first = readers[0]
            self._handles.append(first.register_forward_pre_hook(lambda _m, args, site=site: self._observe(site, args[0])))
            observed.append(first)
        return observed

    def _observe(self, site: str, x: torch.Tensor) -> None:
        stats = self._stats.get(site)
        if stats is None:
            samples = self.config.samples if self.config.inputs is not None else 0
            stats = self._stats[site] = _InputStats(x.shape[-1], x.device, samples)
        stats.add(x)

    def end_block(self, block: nn.Module, prefix: str, **context: Any) -> None:
        """Search each site's exponent on the observed inputs and fold its scales into the block."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        c = self.config
        for site, producer, readers, tie in self._sites:
            stats = self._stats.get(site)
            if stats is None or stats.n == 0:
                raise ValueError(f"awq: no calibration input reached {readers[0][0]}; add it to ignore")
            weights = [m.weight.detach() for _, m in readers]
            scheme = allocated_scheme(readers[0][1], c.scheme, readers[0][0])  # readers are one fused unit
            act = stats.abs_max if c.statistic == "max" else stats.mean_abs
            s, alpha, info = search_scales(weights, stats.H, act, scheme, c.grid, c.duo_scaling,
                                           x=stats.sample if c.inputs is not None else None, inputs=c.inputs,
                                           statistic=c.statistic, tie=tie)
            with torch.no_grad():
                for _, m in readers:
                    m.weight.data = (m.weight.double() * s.to(m.weight.device)).to(m.weight.dtype)
                # the copies of one producer channel share its scale: any of them gives it
                _divide_output(producer, s if tie is None else s.new_ones(producer.out_features).scatter_(0, tie, s))
            self.report.append({"site": site, "alpha": alpha, **info})
            log.debug("awq %s: alpha %.2f, error %.4g (unscaled %.4g)", site, alpha, info["error"],
                      info["error_unscaled"])
        self._stats.clear()
        self._sites = []


def _v_rows_of_o_inputs(config: Any, v: nn.Linear, o: nn.Linear) -> torch.Tensor | None:
    """Under grouped-query attention, the row of ``v`` each input of ``o`` carries: (o.in_features,) int64.

    Query head ``h`` reads key/value head ``h // (n_heads / n_kv)`` (transformers' ``repeat_kv``), and o's
    inputs are the heads' outputs one after the other, so input ``h * head_dim + d`` carries v's row
    ``(h // group) * head_dim + d``. None when the shapes do not follow that layout.
    """
    n_heads, n_kv, head_dim = head_counts(config)
    if n_heads % n_kv or v.out_features != n_kv * head_dim or o.in_features != n_heads * head_dim:
        return None
    head = torch.arange(n_heads).repeat_interleave(head_dim) // (n_heads // n_kv)
    return head * head_dim + torch.arange(head_dim).repeat(n_heads)


def _divide_output(producer: nn.Module, s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s`` (K,): an RMSNorm's weight, or a linear's rows and bias."""
    s = s.to(producer.weight.device)
    if isinstance(producer, nn.Linear):
        producer.weight.data = (producer.weight.double() / s[:, None]).to(producer.weight.dtype)
        if producer.bias is not None:
            producer.bias.data = (producer.bias.double() / s).to(producer.bias.dtype)
        return
    if getattr(producer, "bias", None) is not None:
        raise ValueError(f"awq: {type(producer).__name__} has a bias, which a scale cannot fold into as AWQ needs")
    producer.weight.data = (producer.weight.double() / s).to(producer.weight.dtype)
