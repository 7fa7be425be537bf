"""The ``prune`` recipe pass: magnitude, Wanda or SparseGPT, unstructured or N:M,
with the sparsity spread across layers by an allocation rule.

Statistics are collected here; the maths lives in :mod:`compressor.algorithms.prune.scores`,
:mod:`compressor.algorithms.prune.masks`, :mod:`compressor.algorithms.prune.sparsegpt` and
:mod:`compressor.algorithms.prune.allocation`. Wanda and SparseGPT calibrate in the
sequential pipeline (each block sees the inputs produced by the already-pruned
blocks before it); magnitude needs no data and runs like ``rtn``.

Allocations other than ``uniform`` are planned before any weight changes
(:meth:`PrunePass.plan`): ``global`` and ``lamp`` from the weights alone;
``owl`` and ``dp`` from one extra calibration sweep over the dense model
(input norms for OWL's outlier ratios and for DP's distortion curves),
as both papers measure them on the dense model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compressor.algorithms.hessian import HessianAccumulator
from compressor.algorithms.prune import allocation as alloc
from compressor.algorithms.prune.masks import SCOPES, check_sparsity, parse_structure, prune_count, select_mask
from compressor.algorithms.prune.scores import InputNormAccumulator, magnitude_scores, wanda_scores
from compressor.algorithms.prune.sparsegpt import sparsegpt_prune
from compressor.core.arch import experts_layout
from compressor.core.coverage import ignore_entry
from compressor.core.passes import Pass, PassConfig, Sweep, register_pass, select_modules
from compressor.core.progress import progress
from compressor.core.sparsity import attach_expert_masks, attach_mask
from compressor.core.state import is_experts_quantized, is_quantized
from compressor.pipeline.inputs import MOE_CALIBRATION, ExpertInputs, SharedInputs, all_reduce_block

__all__ = ["PruneConfig", "PrunePass", "METHODS"]

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
DP_DISTORTIONS = ("output", "relative", "absolute")
_DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "row", "sparsegpt": "layer"}  # as in each method's paper


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PassConfig):
    """Weight pruning of the targeted linears.

    Attributes:
        method: ``"magnitude"`` (|W|, no calibration), ``"wanda"`` (|W| * ||X_j||,
            arXiv 2306.11695) or ``"sparsegpt"`` (OBS mask and weight update,
            arXiv 2301.00774).
        sparsity: fraction of weights pruned, in [0, 1); required for
            ``structure="unstructured"``, omitted for N:M.
        structure: ``"unstructured"`` or ``"N:M"`` (N kept of every M consecutive
            inputs, e.g. ``"2:4"``, 50% sparse).
        scope: comparison group of an unstructured mask: ``"row"`` (every row
            exactly ``floor(s * K)`` pruned) or ``"layer"``; default as in each
            paper (wanda: row, magnitude and sparsegpt: layer).
        block_size: SparseGPT's mask-selection / lazy-update block (columns).
        dampening: SparseGPT's ``lambda`` as a fraction of the mean Hessian diagonal.
        allocation: how ``sparsity`` is spread over the targeted linears (the
            fraction of all their weights pruned stays ``sparsity``):
            ``"uniform"``; ``"global"`` (one |W| threshold); ``"lamp"`` (arXiv
            2010.07611); ``"owl"`` (per block, by outlier ratio, arXiv
            2310.05175); ``"dp"`` (rate-distortion by dynamic programming,
            Xu et al. CVPR 2023). Unstructured only.
        owl_threshold: OWL's M: a score is an outlier above M times the block's mean.
        owl_lambda: OWL's lambda: block sparsities span ``sparsity +- lambda``.
        dp_step: spacing of DP's candidate sparsities (0, step, 2 step, ... < 1).
        dp_distortion: DP's distortion: ``"output"`` (default; the paper's:
            KL of the model's next-token distribution when one decoder block
            alone is pruned, measured on ``dp_probe`` calibration sequences; the
            unit is then a block, all its targeted linears at one sparsity),
            or per linear, cheaper but a worse predictor on SmolLM2:
            ``"relative"`` (squared output error divided by the dense output
            energy) or ``"absolute"``.
        dp_probe: calibration sequences the ``"output"`` distortion is measured on.
        dp_span: ``"output"`` only: candidate sparsities lie within
            ``sparsity +- dp_span`` (each candidate costs a forward per block).
            0.3 was chosen on the dev split (SOTU 2000-2009; Wanda at 70% on
            SmolLM2: 232.4 against 306.6 with 0.2), see docs/pruning.md.
        true_sequential: wanda / sparsegpt: prune a block's linears stage by
            stage in forward order (q/k/v, then o, then gate/up, then down),
            each stage's statistics taken on the inputs the already-pruned
            stages produce (SparseGPT's reference code prunes this way; the
            default, false, calibrates the whole block on its dense forward,
            as Wanda's code and llm-compressor do). Costs up to one more
            (truncated) block forward per stage.
        moe_calibration: fused MoE experts (wanda, sparsegpt): ``"routed"`` (each expert's
            statistics from the tokens the router sends it) or ``"all_experts"`` (every
            calibration token through every expert, for statistics only; the block's output
            keeps the real routing).
        min_expert_tokens: an expert that gets fewer routed calibration tokens than this is
            pruned by magnitude instead (its statistics say too little); a warning counts them.
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    structure: str = "unstructured"
    scope: str | None = None
    block_size: int = 128
    dampening: float = 0.01
    allocation: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    dp_step: float = 0.05
    dp_distortion: str = "output"
    dp_probe: int = 2
    dp_span: float = 0.3
    true_sequential: bool = False
    moe_calibration: str = "routed"
    min_expert_tokens: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.moe_calibration not in MOE_CALIBRATION:
            raise ValueError(f"moe_calibration={self.moe_calibration!r}: use 'routed' or 'all_experts'")
        if isinstance(self.min_expert_tokens, bool) or not isinstance(self.min_expert_tokens, int) \
                or self.min_expert_tokens < 0:
            raise ValueError(f"min_expert_tokens={self.min_expert_tokens!r}: use a non-negative token count, e.g. 16")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: use one of {METHODS}")
        if self.structure == "unstructured":
            if self.sparsity is None:
                raise ValueError("prune: set sparsity (the fraction pruned, e.g. 0.5) or a structure such as '2:4'")
            check_sparsity(self.sparsity)
        else:
            parse_structure(self.structure)
            if self.sparsity is not None:
                raise ValueError(f"sparsity={self.sparsity} with structure={self.structure!r}: N:M fixes the "
                                 "sparsity (1 - N/M); remove sparsity")
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: use one of {SCOPES} (or leave it unset for the method's default)")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: use a positive number of columns, e.g. 128")
        if not 0 <= self.dampening < 1:
            raise ValueError(f"dampening={self.dampening}: use a fraction in [0, 1), e.g. 0.01")
        if self.allocation not in alloc.ALLOCATIONS:
            raise ValueError(f"allocation={self.allocation!r}: use one of {alloc.ALLOCATIONS}")
        if self.allocation != "uniform" and self.structure != "unstructured":
            raise ValueError(f"allocation={self.allocation!r} with structure={self.structure!r}: N:M fixes every "
                             "layer's sparsity; use allocation='uniform' or an unstructured sparsity")
        if self.owl_threshold <= 0:
            raise ValueError(f"owl_threshold={self.owl_threshold}: use a positive multiple of the mean score, e.g. 5")
        if not 0 <= self.owl_lambda < 1:
            raise ValueError(f"owl_lambda={self.owl_lambda}: use a sparsity offset in [0, 1), e.g. 0.08")
        if self.dp_distortion not in DP_DISTORTIONS:
            raise ValueError(f"dp_distortion={self.dp_distortion!r}: use one of {DP_DISTORTIONS}")
        if self.dp_probe < 1:
            raise ValueError(f"dp_probe={self.dp_probe}: use a positive number of calibration sequences, e.g. 2")
        if not 0 < self.dp_span < 1:
            raise ValueError(f"dp_span={self.dp_span}: use a sparsity range in (0, 1), e.g. 0.3")
        if self.true_sequential and self.method == "magnitude":
            raise ValueError("true_sequential with method='magnitude': magnitude pruning reads no layer inputs, so "
                             "there is nothing to take in order; use method 'wanda' or 'sparsegpt', or drop it")
        if not 0 < self.dp_step <= 0.5:
            raise ValueError(f"dp_step={self.dp_step}: use a grid spacing in (0, 0.5], e.g. 0.05")

    @property
    def target(self) -> float | str:
        """What the maths functions take: the fraction, or the ``"N:M"`` string."""
        return self.sparsity if self.structure == "unstructured" else self.structure.replace(" ", "")

    @property
    def resolved_scope(self) -> str:
        return self.scope or _DEFAULT_SCOPE[self.method]

    @property
    def needs_sweep(self) -> bool:
        """Whether the allocation needs a calibration sweep over the dense model (OWL, DP)."""
        return self.allocation in ("owl", "dp")

    @property
    def dp_grid(self) -> list[float]:
        """DP's candidate sparsities: 0, step, 2 step, ... below 1."""
        steps = int(round(1 / self.dp_step))
        grid = [i * self.dp_step for i in range(steps) if i * self.dp_step < alloc.MAX_LAYER_SPARSITY]
        if self.dp_distortion == "output" and self.sparsity is not None:
            grid = [g for g in grid if abs(g - self.sparsity) <= self.dp_span + 1e-9]
        return grid


@register_pass
class PrunePass(Pass):
    """Prune the targeted linears: zeros written into the weight, the mask recorded on the module."""

    name = "prune"
    config_cls = PruneConfig
    weight_pass = "prune"

    def __init__(self, config: PruneConfig):
        super().__init__(config)
        self._inputs = SharedInputs()  # name -> HessianAccumulator | InputNormAccumulator
        accumulator = InputNormAccumulator if config.method == "wanda" else HessianAccumulator
        self._expert_inputs = ExpertInputs(accumulator, config.moe_calibration)
        self._experts: dict[str, nn.Module] = {}
        self.sparsity_plan: dict[str, float] | None = None  # linear name -> sparsity, once planned

    def compressible(self, module: nn.Module) -> bool:
        """Linears and fused-experts modules of a known layout (each expert's gate, up and down pruned as its
        own matrix)."""
        return isinstance(module, nn.Linear) or experts_layout(module) is not None

    @property
    def streams(self) -> bool:  # type: ignore[override]
        """Uniform sparsity reads one block at a time, and so do the sweeps of OWL and of DP with a per-linear
        distortion; LAMP and global allocation rank every weight of the model at once, and DP's ``"output"``
        distortion probes the whole model with each block pruned."""
        cfg = self.config
        return (cfg.allocation in ("uniform", "owl") or cfg.structure != "unstructured"
                or (cfg.allocation == "dp" and cfg.dp_distortion != "output"))

    @property
    def sweeps(self) -> bool:  # type: ignore[override]
        """OWL and DP allocation measure the dense model in a calibration sweep before any block is pruned."""
        return self.config.needs_sweep

    data_parallel = True
    """Wanda's input norms and SparseGPT's Hessians (and the OWL / DP sweep's norms) are sums over the
    calibration tokens, so the ranks add theirs up; DP's ``"output"`` probe runs each rank's share of the
    probe sequences and sums the KL (:func:`compressor.algorithms.allocate.unit_distortion`)."""

    def reduce_statistics(self) -> None:
        """Sum the block's input norms (Wanda) or Hessians (SparseGPT) over the ranks of a data-parallel run."""
        all_reduce_block(self.name, self._inputs, self._experts)

    @property
    def requires_calibration(self) -> bool:  # type: ignore[override]
        """Wanda and SparseGPT need layer inputs, as do OWL and DP allocation; magnitude alone does not."""
        return self.config.method != "magnitude" or self.config.needs_sweep

    # ------------------------------------------------------------ allocation

    def plan(self, model: nn.Module, input_ids: torch.Tensor | None = None, sweep: Sweep | None = None) -> dict[str, float]:
        """Decide every targeted linear's sparsity before any is pruned.

        Args:
            model: the dense model.
            input_ids: (S, L) int64 calibration ids; needed by ``owl`` and ``dp``.
            sweep: runs the sequential pipeline's calibration over the model with given passes
                (:func:`compressor.pipeline.schedule.sweeper`); needed by ``owl`` and ``dp``.

        Returns:
            linear name → sparsity (also kept in :attr:`sparsity_plan`).
        """
        cfg = self.config
        linears = [(n, m) for n, m in select_modules(model, cfg) if isinstance(m, nn.Linear)]
        if cfg.allocation == "uniform" or cfg.structure != "unstructured":
            self.sparsity_plan = {n: cfg.sparsity for n, _ in linears} if cfg.structure == "unstructured" else {}
            return self.sparsity_plan
        experts = [n for n, m in select_modules(model, cfg) if experts_layout(m) is not None]
        if experts:
            raise ValueError(f"prune allocation={cfg.allocation!r} does not allocate over fused MoE experts yet "
                             f"({experts[0]}, {len(experts)} modules): use allocation 'uniform', or add "
                             f"'{ignore_entry(experts[0])}' to ignore and prune the experts in a uniform pass of their own")
        if cfg.allocation in ("global", "lamp"):
            rule = alloc.global_magnitude if cfg.allocation == "global" else alloc.lamp
            plan = dict(zip([n for n, _ in linears], rule([m.weight.data for _, m in linears], cfg.sparsity)))
        else:
            if input_ids is None or sweep is None:
                raise ValueError(f"allocation={cfg.allocation!r} measures the dense model on calibration data: "
                                 "pass calibration=... to compress()")
            statistics = _AllocationSweep(cfg)
            sweep([statistics])
            if cfg.allocation == "dp" and cfg.dp_distortion == "output":
                statistics.probe(model, input_ids[: cfg.dp_probe], quiet=sweep.quiet)
            plan = statistics.allocate({n: m.weight.numel() for n, m in linears})
        self.sparsity_plan = plan
        done = alloc.achieved_sparsity([m.weight.numel() for _, m in linears], [plan[n] for n, _ in linears])
        log.info("prune: %s allocation, %d layers, sparsity %.3f-%.3f, overall %.4f", cfg.allocation, len(plan),
                 min(plan.values()), max(plan.values()), done)
        return plan

    def _target(self, name: str) -> float | str:
        """The sparsity (or N:M string) of one linear under the plan."""
        cfg = self.config
        if cfg.allocation == "uniform" or cfg.structure != "unstructured":
            return cfg.target
        if self.sparsity_plan is None:
            raise ValueError(f"prune allocation={cfg.allocation!r} was not planned: run the pass through "
                             "compressor.compress(), or call PrunePass.plan(model, calibration_ids) first")
        return self.sparsity_plan.get(name, cfg.sparsity)

    # ------------------------------------------------------------ calibration-free (magnitude)

    def apply(self, model: nn.Module, *, quiet: bool = False, only: set[str] | None = None, **context) -> None:
        """Magnitude-prune the targeted linears of ``model`` (restricted to names in ``only`` when given)."""
        if self.requires_calibration:
            raise ValueError(f"prune method={self.config.method!r} needs calibration data: pass calibration=... to "
                             "compress(), or use method='magnitude'")
        layers = [(n, m) for n, m in select_modules(model, self.config)
                  if self.compressible(m) and (only is None or n in only)]
        if not layers and only is None:
            raise ValueError(f"prune: no nn.Linear matches targets={list(self.config.targets)} "
                             f"ignore={list(self.config.ignore)}; check the module names with `compressor inspect`")
        if self.sparsity_plan is None and self.config.allocation != "uniform":
            self.plan(model)  # global / lamp: weights only, no sweep
        log.info("prune: magnitude %s (%s) on %d layers", self.config.target, self.config.allocation, len(layers))
        for name, module in progress(layers, "prune", quiet=quiet):
            self._magnitude(name, module)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Magnitude-prune the targeted linears (and fused experts) inside one block (sequential pipeline)."""
        for name, module in select_modules(block, self.config, prefix):
            if self.compressible(module):
                self._magnitude(name, module)

    def _magnitude(self, name: str, module: nn.Module) -> None:
        self._check_module(name, module)
        if not isinstance(module, nn.Linear):
            self._prune_experts(name, module, None)
            return
        try:
            mask = select_mask(magnitude_scores(module.weight.data), self._target(name), self.config.resolved_scope)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        self._write(name, module, module.weight.data, mask)

    # ------------------------------------------------------------ calibrated (wanda, sparsegpt)

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Hook every targeted linear of ``block`` to accumulate its input statistics.

        Wanda keeps ``2/n sum x_j^2`` per input feature, SparseGPT the full
        Hessian; linears fed the same tensor (q/k/v, gate/up) share one accumulator.

        Returns:
            the observed linears.
        """
        found = self.block_modules(block, prefix)
        linears = [(n, m) for n, m in found if isinstance(m, nn.Linear)]
        self._experts = {n: m for n, m in found if experts_layout(m) is not None}
        for name, module in linears + list(self._experts.items()):
            self._check_module(name, module)
        if self.config.method == "magnitude":  # calibrated only for the allocation's sweep: no statistics here
            return []
        return self._inputs.hook(linears, self._observe) + self._expert_inputs.hook(self._experts.items())

    def _observe(self, name: str, x: torch.Tensor) -> None:
        cls = InputNormAccumulator if self.config.method == "wanda" else HessianAccumulator
        acc = self._inputs.accumulator(name, x, lambda: cls(x.shape[-1], x.device))
        if acc is not None:
            acc.add(x)

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Prune the block's targeted linears from the collected statistics."""
        self._inputs.close()
        if self.config.method == "magnitude":
            self.compress_block(block, prefix)
            return
        modules = dict(self.block_modules(block, prefix))
        for name, acc in self._inputs.stats.items():
            module = modules[name]
            w = module.weight.data
            try:
                if self.config.method == "wanda":
                    mask = select_mask(wanda_scores(w, acc.norms), self._target(name), self.config.resolved_scope)
                    new = w
                else:
                    res = sparsegpt_prune(w, acc.H, self._target(name), scope=self.config.resolved_scope,
                                          block_size=self.config.block_size, dampening=self.config.dampening)
                    new, mask = res.weight, res.mask
                    log.debug("sparsegpt %s loss %.4g", name, res.loss)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            self._write(name, module, new, mask)
        missing = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in self._inputs.stats]
        if missing:
            log.warning("prune: %d targeted linears saw no calibration input and were left dense: %s",
                        len(missing), ", ".join(missing[:5]))
        self._inputs.clear()
        self._expert_inputs.close()
        for name, module in self._experts.items():
            self._prune_experts(name, module, self._expert_inputs.stats.get(name))
        self._experts.clear()
        self._expert_inputs.clear()

    def _prune_experts(self, name: str, module: nn.Module, stats: dict | None) -> None:
        """Prune every expert's gate, up and down as its own matrix, in place, one expert at a time.

        ``stats`` are the module's :class:`compressor.pipeline.inputs.ExpertInputs` statistics (None for
        magnitude). Each fused parameter's rows split into the per-expert linears it holds
        (``gate_up_proj`` (E, 2I, H) into gate and up), so a layer-scope mask compares within one
        projection, as it does for a dense ``gate_proj``. Experts with fewer than
        ``min_expert_tokens`` routed tokens are pruned by magnitude, with a warning.
        """
        cfg = self.config
        layout = experts_layout(module)
        n_experts = getattr(module, layout.params[0][0]).shape[0]
        fallback = set(range(n_experts)) if cfg.method == "magnitude" else \
            set(self._expert_inputs.starved(name, n_experts, cfg.min_expert_tokens))
        target, scope = cfg.target, cfg.resolved_scope
        masks = {}
        with torch.no_grad():
            for pname, splits in layout.params:
                param = getattr(module, pname)
                mask = torch.ones(param.shape, dtype=torch.bool, device=param.device)  # (E, N, K)
                rows = param.shape[1] // len(splits)
                for e in range(n_experts):
                    acc = stats[pname][e] if stats and e not in fallback else None
                    for j in range(len(splits)):
                        w = param.data[e, j * rows:(j + 1) * rows]  # (rows, K), a view into the parameter
                        try:
                            if acc is None:
                                keep = select_mask(magnitude_scores(w), target, scope)
                            elif cfg.method == "wanda":
                                keep = select_mask(wanda_scores(w, acc.norms), target, scope)
                            else:
                                res = sparsegpt_prune(w, acc.H, target, scope=scope, block_size=cfg.block_size,
                                                      dampening=cfg.dampening)
                                w.copy_(res.weight)
                                keep = res.mask
                        except ValueError as err:
                            raise ValueError(f"{name}.{pname}[{e}] ({splits[j]}): {err}") from None
                        mask[e, j * rows:(j + 1) * rows] = keep
                masks[pname] = mask
        attach_expert_masks(module, masks, cfg.method, cfg.structure)
        if cfg.method != "magnitude" and fallback:
            log.warning("prune %s: %d of %d experts got fewer than min_expert_tokens=%d calibration tokens and were "
                        "pruned by magnitude instead (more calibration data, or moe_calibration: all_experts, helps)",
                        name, len(fallback), n_experts, cfg.min_expert_tokens)
        log.debug("prune %s: %.1f%% zeros", name, 100 * module.sparsity_info.sparsity)

    # ------------------------------------------------------------ shared

    def _check_module(self, name: str, module: nn.Module) -> None:
        if is_quantized(module) or is_experts_quantized(module):
            raise ValueError(f"{name} is already quantized: pruning moves weights off the quantization grid; "
                             "put the prune pass before the quantization pass in the recipe")

    def _write(self, name: str, module: nn.Linear, weight: torch.Tensor, mask: torch.Tensor) -> None:
        attach_mask(module, weight, mask, self.config.method, self.config.structure)
        log.debug("prune %s: %.1f%% zeros", name, 100 * module.sparsity_info.sparsity)


class _AllocationSweep(Pass):
    """Calibration sweep over the dense model measuring what OWL or DP allocate by; prunes nothing.

    Both keep each linear's input norms ``||X_j||``. OWL reduces a block to its
    outlier ratio (:func:`compressor.algorithms.prune.allocation.outlier_ratio` of the
    block's Wanda scores); DP turns each linear into a distortion curve, its
    output error when pruned alone at every candidate sparsity (:meth:`_curve`).
    """

    name = "prune-allocation-sweep"
    config_cls = PruneConfig
    requires_calibration = True
    data_parallel = True  # its input norms are summed over the ranks like Wanda's
    staged = False  # it measures the dense model: nothing changes between stages

    def __init__(self, config: PruneConfig):
        super().__init__(config)
        self._inputs = SharedInputs()
        self.block_ratios: dict[str, float] = {}  # block prefix -> OWL outlier ratio
        self.block_members: dict[str, list[str]] = {}  # block prefix -> its linears
        self.curves: dict[str, list[float]] = {}  # linear -> DP distortion at each grid sparsity
        self.norms: dict[str, torch.Tensor] = {}  # linear -> input norms (DP "output", probed after the sweep)
        self.block_curves: torch.Tensor | None = None  # (blocks, grid) DP "output" distortions
        self.block_prefixes: list[str] = []

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Hook the block's targeted linears to accumulate their input norms."""
        linears = [(n, m) for n, m in select_modules(block, self.config, prefix) if isinstance(m, nn.Linear)]
        self.block_members[prefix] = [n for n, _ in linears]
        return self._inputs.hook(linears, self._observe)

    def _observe(self, name: str, x: torch.Tensor) -> None:
        acc = self._inputs.accumulator(name, x, lambda: InputNormAccumulator(x.shape[-1], x.device))
        if acc is not None:
            acc.add(x)

    def reduce_statistics(self) -> None:
        """Sum the block's input norms over the ranks of a data-parallel run."""
        self._inputs.all_reduce()

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Reduce the block's statistics to OWL ratios or DP curves."""
        self._inputs.close()
        modules = dict(select_modules(block, self.config, prefix))
        if self.config.allocation == "owl":
            scores = [wanda_scores(modules[n].weight.data, acc.norms) for n, acc in self._inputs.stats.items()]
            if scores:
                self.block_ratios[prefix] = alloc.outlier_ratio(scores, self.config.owl_threshold)
        elif self.config.dp_distortion == "output":  # masks are chosen later, in probe()
            self.norms.update({name: acc.norms.detach().cpu() for name, acc in self._inputs.stats.items()})
        else:
            for name, acc in self._inputs.stats.items():
                self.curves[name] = self._curve(modules[name].weight.data, acc.norms)
        self._inputs.clear()

    def _scores(self, weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """The method's own pruning order: |W| for magnitude, Wanda scores otherwise."""
        return magnitude_scores(weight) if self.config.method == "magnitude" else wanda_scores(weight, norms)

    def probe(self, model: nn.Module, input_ids: torch.Tensor, quiet: bool = False) -> None:
        """DP ``"output"`` distortion: KL of the model's output with one block pruned at each candidate.

        Args:
            model: the dense model (unchanged on return).
            input_ids: (P, T) int64 probe sequences.
        """
        from compressor.algorithms.prune.probe import output_distortion
        from compressor.core.arch import find_blocks

        blocks_name, blocks = find_blocks(model)
        prefixes = [f"{blocks_name}.{i}" for i in range(len(blocks))]
        modules = dict(model.named_modules())
        scores = {n: self._scores(modules[n].weight.data, self.norms[n].to(modules[n].weight.device))
                  for n in self.norms}
        scope = self.config.resolved_scope

        def masks(i: int, s: float) -> list[tuple[nn.Module, torch.Tensor]]:
            return [(modules[n], select_mask(scores[n], s, scope))
                    for n in self.block_members.get(prefixes[i], []) if n in scores]

        self.block_curves = output_distortion(model, input_ids, self.config.dp_grid, masks, quiet=quiet)
        self.block_prefixes = prefixes

    def _curve(self, weight: torch.Tensor, norms: torch.Tensor) -> list[float]:
        """Output error of the linear pruned alone at each grid sparsity, from sorted cumulative sums.

        Removing weight ``w_ij`` adds ``w_ij^2 ||X_j||^2`` to the squared output
        error when the input features are uncorrelated (the diagonal of the
        Hessian, the same approximation Wanda's score makes), so one sort and
        one cumulative sum give the whole curve, with the method's own order
        (Wanda scores, or |W| for magnitude) and comparison group.
        """
        w = weight.detach().float()  # (N, K)
        energy = w.pow(2) * norms.to(w.device, torch.float32).pow(2)[None, :]  # (N, K) error if pruned
        scores = self._scores(w, norms)
        n, k = w.shape
        if self.config.resolved_scope == "row":  # every row loses the same count
            order = torch.argsort(scores, dim=1, stable=True)
            cum = torch.cumsum(torch.gather(energy, 1, order).double(), dim=1).sum(0)  # (K,) error after c prunes/row
            cum = torch.cat([cum.new_zeros(1), cum])
            counts = [prune_count(k, s) for s in self.config.dp_grid]
        else:
            order = torch.argsort(scores.reshape(-1), stable=True)
            cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(energy.reshape(-1)[order].double(), 0)])
            counts = [prune_count(n * k, s) for s in self.config.dp_grid]
        scale = (float(energy.double().sum()) or 1.0) if self.config.dp_distortion == "relative" else 1.0
        return [float(cum[c]) / scale for c in counts]

    def allocate(self, sizes: dict[str, int]) -> dict[str, float]:
        """Linear name → sparsity from the sweep's statistics.

        Args:
            sizes: every targeted linear's weight count (linears the sweep did
                not see, e.g. outside the decoder blocks, keep the target).
        """
        cfg = self.config
        if cfg.allocation == "owl":
            blocks = list(self.block_ratios)
            if not blocks:
                raise ValueError("owl: no targeted linear inside the decoder blocks saw calibration data")
            per_block = alloc.owl([self.block_ratios[b] for b in blocks], cfg.sparsity, cfg.owl_lambda)
            plan = {n: s for b, s in zip(blocks, per_block) for n in self.block_members[b]}
        elif cfg.dp_distortion == "output":
            if self.block_curves is None:
                raise ValueError("dp output distortion was not probed: call probe(model, ids) after the sweep")
            members = [[n for n in self.block_members.get(b, []) if n in sizes] for b in self.block_prefixes]
            rows = [i for i, m in enumerate(members) if m]
            if not rows:
                raise ValueError("dp: no targeted linear inside the decoder blocks saw calibration data")
            picks = alloc.rate_distortion(self.block_curves[rows], cfg.dp_grid,
                                          [sum(sizes[n] for n in members[i]) for i in rows], cfg.sparsity)
            plan = {n: s for i, s in zip(rows, picks) for n in members[i]}
        else:
            names = [n for n in sizes if n in self.curves]
            if not names:
                raise ValueError("dp: no targeted linear inside the decoder blocks saw calibration data")
            picks = alloc.rate_distortion(torch.tensor([self.curves[n] for n in names]), cfg.dp_grid,
                                          [sizes[n] for n in names], cfg.sparsity)
            plan = dict(zip(names, picks))
        return {n: plan.get(n, cfg.sparsity) for n in sizes}
