"""The ``prune_experts`` recipe pass: drop the lowest-scored routed experts of every MoE block.

Statistics (routed-token counts and REAP sums) are collected here, from the tokens the router really
sends each expert in the sequential pipeline; scoring and slicing live in
:mod:`compressor.algorithms.prune.experts`. Every MoE block loses the same number of experts, so the
model keeps one ``num_experts`` in its config and exports as a plain checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import nn

from compressor.algorithms.prune.experts import EXPERT_SCORES, ExpertScoreAccumulator, keep_experts, remove_experts
from compressor.core.arch import ROUTER_GROUP_KEYS, block_config, moe_parts, set_expert_count
from compressor.core.passes import Pass, PassConfig, register_pass
from compressor.core.sparsity import is_pruned
from compressor.core.state import is_experts_quantized

__all__ = ["ExpertPruneConfig", "ExpertPrunePass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ExpertPruneConfig(PassConfig):
    """Remove whole routed experts, the same count in every MoE block.

    Attributes:
        fraction: fraction of each MoE block's routed experts removed, ``floor(fraction * E)``, in (0, 1).
        score: ``"reap"`` (router-weighted output norm, REAP, arXiv 2510.13999) or ``"frequency"``
            (routed-token count), both from the calibration tokens.

    Shared experts are plain MLPs and stay. ``targets``/``ignore`` must stay at their defaults: every MoE
    block is pruned alike, or no plain config could describe the model.
    """

    fraction: float = 0.25
    score: str = "reap"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 1:
            raise ValueError(f"prune_experts.fraction={self.fraction!r}: use a fraction of the experts in (0, 1), "
                             "e.g. 0.25")
        if self.score not in EXPERT_SCORES:
            raise ValueError(f"prune_experts.score={self.score!r}: use one of {EXPERT_SCORES}")
        if self.targets != PassConfig().targets or set(self.ignore) - {"lm_head"}:
            raise ValueError("prune_experts prunes every MoE block alike (a plain config has one num_experts): "
                             "remove targets/ignore from its config")


@register_pass
class ExpertPrunePass(Pass):
    """Score every routed expert on the calibration tokens routed to it and drop the lowest of each MoE block."""

    name = "prune_experts"
    config_cls = ExpertPruneConfig
    requires_calibration = True
    resumable = False  # a block checkpoint restores into the unpruned shapes

    def __init__(self, config: ExpertPruneConfig):
        super().__init__(config)
        self._stats: dict[str, ExpertScoreAccumulator] = {}
        self._handles: list = []
        self.removed: dict[str, list[int]] = {}  # experts module name -> the expert indices it dropped

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Hook the block's fused experts to count and score the tokens routed to each expert.

        Returns:
            the observed experts modules (none in a dense block).
        """
        parts = moe_parts(block, prefix)
        observed = []
        for name, router, experts in parts:
            self._check(name, router, experts)
            self._stats[name] = ExpertScoreAccumulator(experts.gate_up_proj.shape[0])
            self._handles.append(experts.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: self._observe(name, mod, args, kwargs), with_kwargs=True))
            observed.append(experts)
        return observed

    def _observe(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        if len(values) < 3:
            raise ValueError(f"{name}: the experts were called without router weights; prune_experts needs "
                             "(hidden_states, top_k_index, top_k_weights)")
        x, index, weights = values[:3]
        x = x.reshape(-1, x.shape[-1])
        self._stats[name].add(module, x, index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1))

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Drop each MoE module's lowest-scored experts and update the config."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        config = block_config(block)
        for name, router, experts in moe_parts(block, prefix):
            stats = self._stats.pop(name, None)
            if stats is None or not int(stats.tokens.sum()):
                raise ValueError(f"{name} saw no calibration tokens: cannot score its experts")
            n = experts.gate_up_proj.shape[0]
            remove = self._count(n, name)
            keep = keep_experts(stats.scores(self.config.score), remove)
            dropped = sorted(set(range(n)) - set(keep.tolist()))
            remove_experts(router, experts, keep)
            self.removed[name] = dropped
            changed = set_expert_count(config, len(keep))
            if changed:  # the first MoE block; later ones match
                log.info("prune_experts (%s score): config now %s", self.config.score, changed)
            log.info("prune_experts %s: dropped experts %s (routed tokens %s)", name, dropped,
                     [int(stats.tokens[e]) for e in dropped])
        self._stats.clear()

    def _count(self, n_experts: int, name: str) -> int:
        remove = math.floor(self.config.fraction * n_experts)
        if remove < 1:
            raise ValueError(f"prune_experts.fraction={self.config.fraction} removes no expert of {name}'s "
                             f"{n_experts}: use at least {1 / n_experts:.3g}")
        return remove

    def _check(self, name: str, router: nn.Module, experts: nn.Module) -> None:
        """Refuse what dropping experts would break, before any forward."""
        n = experts.gate_up_proj.shape[0]
        remove = self._count(n, name)
        top_k = getattr(router, "top_k", None)
        if isinstance(top_k, int) and top_k > n - remove:
            raise ValueError(f"prune_experts would leave {n - remove} experts in {name}, fewer than the "
                             f"{top_k} each token is routed to: use a smaller fraction")
        groups = next((getattr(router, k) for k in ROUTER_GROUP_KEYS if isinstance(getattr(router, k, None), int)), 1)
        if groups > 1:
            raise ValueError(f"{name}: its router picks experts within {groups} groups (group-limited routing); "
                             "dropping experts would break the groups. prune_experts does not handle it yet")
        if is_experts_quantized(experts) or is_pruned(experts):
            raise ValueError(f"{name} is already quantized or pruned: put prune_experts first in the recipe")
