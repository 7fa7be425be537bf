"""The ``gptq`` pass: collects each targeted linear's input Hessian block by block, then quantizes with GPTQ.

A thin adapter: the maths is :func:`compressor.algorithms.quant.gptq.gptq_quantize`
(GPTQ, arXiv 2210.17323; GPTAQ's asymmetric calibration, arXiv 2504.02692).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.algorithms.hessian import HessianAccumulator
from compressor.algorithms.quant.gptq import ACTORDER, gptq_quantize
from compressor.core.arch import experts_layout, fused_groups
from compressor.core.layers import is_quantizable
from compressor.core.passes import Pass, PassConfig, register_pass
from compressor.core.scheme import QuantScheme, shared_global_scales
from compressor.core.sparsity import expert_mask, prune_mask
from compressor.core.state import allocated_scheme, attach_qparams
from compressor.passes.rtn import quantize_experts, round_matrix
from compressor.pipeline.inputs import MOE_CALIBRATION, ExpertInputs, SharedInputs, all_reduce_block

__all__ = ["GPTQConfig", "GPTQPass", "check_sweep_options"]

log = logging.getLogger(__name__)



def check_sweep_options(block_size: int, dampening: float) -> None:
    """Refuse a GPTQ column sweep's lazy-update block width or dampening out of range (ValueError)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: use a positive number of columns, e.g. 128")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening={dampening}: use a fraction in [0, 1), e.g. 0.01")


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(PassConfig):
    """GPTQ weight quantization.

    Attributes:
        scheme: the weight scheme.
        block_size: lazy-update block width (columns).
        dampening: fraction of the mean Hessian diagonal added to the diagonal.
        actorder: ``"none"``, ``"static"`` or ``"group"`` (see :func:`gptq_quantize`).
        asymmetric: asymmetric calibration (GPTAQ, arXiv 2504.02692): also use the
            full-precision model's inputs of each layer so the rounding absorbs the
            error of the blocks before it. Costs a second (truncated) forward per
            batch and one more K x K product per input.
        asymmetric_weight: ``alpha`` of the asymmetric term.
        refit_scales: after rounding, re-solve the group scales for the chosen
            codes by least squares on the layer output (:func:`refit_scales`). Integer grids only: float
            formats (FP8, NVFP4, MXFP4) keep the scales their format stores.
            On by default: on SmolLM2 it lowered perplexity at every setting
            measured (W3 g64 38.46 -> 35.61); ``false`` gives the paper's GPTQ.
        true_sequential: quantize a block's linears stage by stage in forward
            order (q/k/v, then o, then gate/up, then down), each stage's
            Hessians taken on the inputs the already-quantized stages produce,
            as the GPTQ reference code's ``--true-sequential``. Costs up to one
            more (truncated) block forward per stage.
        moe_calibration: fused MoE experts: ``"routed"`` (each expert's Hessians from the
            tokens the router sends it) or ``"all_experts"`` (every calibration token through
            every expert, for statistics only: the block's output keeps the real routing,
            as llm-compressor's ``moe_calibrate_all_experts``).
        min_expert_tokens: an expert that gets fewer calibration tokens than this is
            rounded to nearest instead (its Hessian says too little); a warning counts them.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    block_size: int = 128
    dampening: float = 0.01
    actorder: str = "static"
    asymmetric: bool = False
    asymmetric_weight: float = 0.25
    refit_scales: bool = True
    true_sequential: bool = False
    moe_calibration: str = "routed"
    min_expert_tokens: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.moe_calibration not in MOE_CALIBRATION:
            raise ValueError(f"moe_calibration={self.moe_calibration!r}: use 'routed' or 'all_experts'")
        if self.actorder not in ACTORDER:
            raise ValueError(f"actorder={self.actorder!r}: use one of {ACTORDER}")
        check_sweep_options(self.block_size, self.dampening)
        if self.scheme.is_float and self.actorder == "group":
            raise ValueError(f"gptq: {self.scheme.describe()} takes actorder none or static (float formats store "
                             "no column order)")
        if self.asymmetric_weight < 0:
            raise ValueError(f"asymmetric_weight={self.asymmetric_weight}: use a non-negative scale, e.g. 0.25")


@register_pass
class GPTQPass(Pass):
    """Collect input Hessians of each targeted linear in a block, then quantize them with GPTQ."""

    name = "gptq"
    config_cls = GPTQConfig
    weight_pass = "quantize"
    requires_calibration = True
    streams = True
    data_parallel = True

    def __init__(self, config: GPTQConfig):
        super().__init__(config)
        self._inputs = SharedInputs()
        self._fp: dict[str, torch.Tensor] = {}
        self._experts: dict[str, nn.Module] = {}
        # subclasses (the gguf pass) may have no MoE options: routed statistics
        self._expert_inputs = ExpertInputs(HessianAccumulator, getattr(config, "moe_calibration", "routed"))

    def compressible(self, module: nn.Module) -> bool:
        """Layers and fused-experts modules of a known layout."""
        return is_quantizable(module) or experts_layout(module) is not None

    @property
    def wants_fp_targets(self) -> bool:
        """Asymmetric calibration needs the pipeline's full-precision stream."""
        return self.config.asymmetric

    @property
    def wants_fp_inputs(self) -> bool:
        """Run each batch of the full-precision stream through the hooks just before the compressed one."""
        return self.config.asymmetric

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Register hooks accumulating the Hessian of every targeted linear in ``block``.

        Linears fed the very same input tensor (q/k/v, gate/up) share one
        accumulator, so each distinct input is multiplied out once.

        Returns:
            the observed linears (the pipeline stops each forward once it has entered the last).
        """
        found = self.block_modules(block, prefix)
        linears = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
        self._experts = {n: m for n, m in found if experts_layout(m) is not None}
        # GPTAQ's asymmetric term is not applied to experts: the two streams route differently
        experts = self._expert_inputs.hook(self._experts.items(), skip=lambda: self.stream == "fp")
        return self._inputs.hook(linears, self._observe) + experts

    def _observe(self, name: str, x: torch.Tensor) -> None:
        if self.stream == "fp":  # paired with the compressed stream's next batch
            self._fp[name] = x
            return
        fp = self._fp.pop(name, None)
        if self.config.asymmetric and fp is None:
            raise ValueError(f"{name}: asymmetric GPTQ got no full-precision input for this batch; "
                             "run it through compress() (the sequential pipeline pairs the streams)")
        acc = self._inputs.accumulator(name, x, lambda: HessianAccumulator(x.shape[-1], x.device))
        if acc is not None:
            acc.add(x, fp)

    @property
    def _refit(self) -> bool:
        return self.config.refit_scales and not self.config.scheme.is_float

    def reduce_statistics(self) -> None:
        """Sum the block's Hessians (and GPTAQ cross terms) over the ranks of a data-parallel run."""
        all_reduce_block(self.name, self._inputs, self._experts)

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Quantize the block's targeted linears from the collected Hessians."""
        self._inputs.close()
        modules = dict(self.block_modules(block, prefix))
        names = list(self._inputs.stats)
        gscales = shared_global_scales({n: modules[n].weight.data for n in names}, fused_groups(names),
                                       self.config.scheme)  # from the weights before any is quantized
        for name, acc in self._inputs.stats.items():
            module = modules[name]
            try:
                scheme = allocated_scheme(module, self.config.scheme, name)
                res = gptq_quantize(module.weight.data, acc.H, scheme, block_size=self.config.block_size,
                                    dampening=self.config.dampening, actorder=self.config.actorder,
                                    cross=acc.C, cross_weight=self.config.asymmetric_weight,
                                    refit=self._refit, mask=prune_mask(module), gscale=gscales[name])
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            attach_qparams(module, scheme, res.qparams, res.weight, res.g_idx)
            log.debug("gptq %s loss %.4g", name, res.loss)
        self._expert_inputs.close()
        for name, module in self._experts.items():
            self._quantize_experts(name, module, self._expert_inputs.stats.get(name))
        self._experts.clear()
        self._expert_inputs.clear()
        self._inputs.clear()
        self._fp.clear()

    def _quantize_experts(self, name: str, module: nn.Module, stats: dict | None) -> None:
        """GPTQ each expert's gate/up and down from its own Hessians, in place, one expert at a time; experts
        with fewer than ``min_expert_tokens`` tokens are rounded to nearest."""
        c = self.config
        layout = experts_layout(module)
        # "group" activation order needs a g_idx per expert matrix, which the per-expert export does not carry
        actorder = "static" if c.actorder == "group" else c.actorder
        n_experts = getattr(module, layout.params[0][0]).shape[0]
        rounded = set(self._expert_inputs.starved(name, n_experts, c.min_expert_tokens))

        def solve(pname: str, e: int, w: torch.Tensor):
            acc = stats[pname][e] if stats else None
            keep = expert_mask(module, pname, e)
            if e in rounded or acc is None:
                return round_matrix(w if keep is None else w.masked_fill(~keep, 0), c.scheme)
            try:
                res = gptq_quantize(w, acc.H, c.scheme, block_size=c.block_size, dampening=c.dampening,
                                    actorder=actorder, refit=self._refit, mask=keep)
            except ValueError as err:
                raise ValueError(f"{name}.{pname}[{e}]: {err}") from None
            return res.weight, res.qparams

        quantize_experts(module, c.scheme, solve)
        if rounded:
            log.warning("gptq %s: %d of %d experts got fewer than min_expert_tokens=%d calibration tokens and were "
                        "rounded to nearest instead (more calibration data, or moe_calibration: all_experts, helps)",
                        name, len(rounded), n_experts, c.min_expert_tokens)
