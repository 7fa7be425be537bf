"""The ``prune_structured`` recipe pass: remove MLP channels and attention heads in every decoder block.

Statistics are collected here (the input norms of ``down_proj``, the per-head
second moments of ``o_proj``'s input); scoring, selection and the slicing of
the linears live in :mod:`compressor.algorithms.prune.structured`. The activation score
calibrates in the sequential pipeline, which recomputes each block's outputs
after the block has shrunk; magnitude needs no data and runs like ``rtn``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compressor.algorithms.prune.masks import prune_count
from compressor.algorithms.prune.scores import InputNormAccumulator
from compressor.algorithms.prune.structured import (
    UnitCovarianceAccumulator,
    head_scores,
    keep_indices,
    mlp_channel_scores,
    remove_heads,
    remove_mlp_channels,
)
from compressor.core.arch import (
    DecoderLayout,
    attention_head_dim,
    block_config,
    find_blocks,
    layout_of_config,
    set_config_shapes,
)
from compressor.core.passes import Pass, PassConfig, register_pass
from compressor.core.progress import progress
from compressor.core.sparsity import is_pruned
from compressor.core.state import is_quantized
from compressor.pipeline.inputs import SharedInputs
from compressor.runtime.online import online_transforms

__all__ = ["SCORES", "HEAD_UNITS", "StructuredPruneConfig", "StructuredPrunePass"]

log = logging.getLogger(__name__)

SCORES = ("magnitude", "activation")
HEAD_UNITS = ("query", "group")


# ---------------------------------------------------------------- one block






def _check_block(block: nn.Module, layout: DecoderLayout, prefix: str) -> None:
    for path in (layout.q, layout.k, layout.v, layout.o, layout.gate, layout.up, layout.down):
        try:
            module = block.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{prefix}: no {path} in {type(block).__name__}; this block does not match the "
                             "gated-MLP layout in compressor.core.arch.LAYOUTS") from None
        name = f"{prefix}.{path}"
        if is_quantized(module):
            raise ValueError(f"{name} is already quantized: put prune_structured before the quantization pass")
        if is_pruned(module):
            raise ValueError(f"{name} already carries a pruning mask that removing rows/columns would break: "
                             "put prune_structured before the prune pass")
        if online_transforms(module):
            raise ValueError(f"{name} rotates its input online, so its columns are no longer channels or heads: "
                             "rotate with r4=false (fused rotations only) or drop the rotate pass")
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}, not a plain nn.Linear")


# ---------------------------------------------------------------- the pass


def _check_fraction(name: str, value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name}={value!r}: use the fraction of {what} to remove, in [0, 1), e.g. 0.25")


def _count(fraction: float, total: int, field: str, what: str, hint: str = "") -> int:
    """``floor(fraction * total)`` removed; an error when a positive fraction removes none."""
    count = prune_count(total, fraction)
    if fraction > 0 and count == 0:
        if total == 1:
            raise ValueError(f"{field}={fraction}: there is only 1 of the {what}{hint}")
        scale = 10 ** (len(str(total)) + 1)
        smallest = math.ceil(scale / total) / scale  # the shortest decimal with floor(smallest * total) >= 1
        raise ValueError(f"{field}={fraction} removes floor({fraction} * {total}) = 0 of the {total} {what}; "
                         f"use at least {smallest:g}{hint}")
    return count


@dataclass(frozen=True, kw_only=True)
class StructuredPruneConfig(PassConfig):
    """Remove MLP channels and attention heads, the same count in every decoder block.

    Attributes:
        mlp_fraction: fraction of each gated MLP's intermediate channels removed,
            ``floor(mlp_fraction * intermediate_size)``, in [0, 1).
        head_fraction: fraction of attention heads removed, in [0, 1): with
            ``head_unit="query"`` ``floor(head_fraction * n_rep)`` query heads of
            every KV group; with ``"group"`` ``floor(head_fraction * n_kv)`` whole
            KV groups.
        score: ``"activation"`` (channel / head contribution norms from
            calibration data) or ``"magnitude"`` (weight norms, no data).
        head_unit: ``"query"`` (KV heads kept) or ``"group"`` (KV groups removed).

    ``targets``/``ignore`` must stay at their defaults: every decoder block is
    pruned alike, or no plain config could describe the model.
    """

    mlp_fraction: float = 0.0
    head_fraction: float = 0.0
    score: str = "activation"
    head_unit: str = "query"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("mlp_fraction", self.mlp_fraction, "MLP channels")
        _check_fraction("head_fraction", self.head_fraction, "attention heads")
        if self.mlp_fraction == 0 and self.head_fraction == 0:
            raise ValueError("prune_structured removes nothing: set mlp_fraction and/or head_fraction, e.g. 0.25")
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r}: use one of {SCORES}")
        if self.head_unit not in HEAD_UNITS:
            raise ValueError(f"head_unit={self.head_unit!r}: use one of {HEAD_UNITS}")
        if self.targets != PassConfig().targets or set(self.ignore) - {"lm_head"}:
            raise ValueError("prune_structured prunes every decoder block alike (a plain config has one "
                             "intermediate_size and one head count): remove targets/ignore from its config")


@register_pass
class StructuredPrunePass(Pass):
    """Remove the lowest-scored MLP channels and attention heads of every decoder block; update the config."""

    name = "prune_structured"
    config_cls = StructuredPruneConfig

    def __init__(self, config: StructuredPruneConfig):
        super().__init__(config)
        self._inputs = SharedInputs()  # name -> InputNormAccumulator (down_proj) | UnitCovarianceAccumulator (o_proj)
        self._paths: dict[str, str] = {}  # qualified name -> layout path, for the block being calibrated
        self._down, self._unit_width = "", 0

    @property
    def requires_calibration(self) -> bool:  # type: ignore[override]
        """The activation score needs the inputs of ``down_proj`` and ``o_proj``; magnitude does not."""
        return self.config.score == "activation"

    def apply(self, model: nn.Module, *, quiet: bool = False, only: set[str] | None = None, **context) -> None:
        """Magnitude-prune every decoder block of ``model`` (nothing to do outside the blocks, ``only``)."""
        if self.requires_calibration:
            raise ValueError("prune_structured score='activation' needs calibration data: pass calibration=... "
                             "to compress(), or use score='magnitude'")
        if only is not None:
            return
        blocks_name, blocks = find_blocks(model)
        for i in progress(range(len(blocks)), "prune_structured", quiet=quiet):
            self.compress_block(blocks[i], f"{blocks_name}.{i}")

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Magnitude-prune one block (sequential pipeline, or :meth:`apply`)."""
        self._prune(block, prefix, {})

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Hook ``o_proj`` and/or ``down_proj`` of ``block`` to accumulate the statistics of their inputs.

        Returns:
            the observed linears.
        """
        config = block_config(block)
        layout = layout_of_config(config, "prune_structured", kind="gated-MLP")
        _check_block(block, layout, prefix)
        head_dim, watch = attention_head_dim(block.get_submodule(layout.attention), config), []
        self._removals(block, layout, head_dim)  # a fraction that removes nothing fails before the forwards
        if self.config.mlp_fraction > 0:
            watch.append(layout.down)
        if self.config.head_fraction > 0:
            watch.append(layout.o)
            n_rep = block.get_submodule(layout.q).out_features // block.get_submodule(layout.k).out_features
            self._unit_width = head_dim * (n_rep if self.config.head_unit == "group" else 1)
        self._paths, self._down = {f"{prefix}.{p}": p for p in watch}, layout.down
        return self._inputs.hook([(f"{prefix}.{p}", block.get_submodule(p)) for p in watch], self._observe)

    def _observe(self, name: str, x: torch.Tensor) -> None:
        def make() -> InputNormAccumulator | UnitCovarianceAccumulator:
            if self._paths[name] == self._down:
                return InputNormAccumulator(x.shape[-1], x.device)
            return UnitCovarianceAccumulator(x.shape[-1] // self._unit_width, self._unit_width, x.device)

        acc = self._inputs.accumulator(name, x, make)
        if acc is not None:
            acc.add(x)

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Score from the collected statistics and remove the lowest channels / heads."""
        self._inputs.close()
        stats = {self._paths[n]: acc for n, acc in self._inputs.stats.items()}
        self._inputs.clear()
        self._prune(block, prefix, stats)

    def _removals(self, block: nn.Module, layout: DecoderLayout, head_dim: int) -> tuple[int, int]:
        """(MLP channels, heads per KV group or KV groups) to remove from ``block``; errors for a count of 0."""
        cfg = self.config
        inter = block.get_submodule(layout.down).in_features
        n_kv = block.get_submodule(layout.k).out_features // head_dim
        n_rep = block.get_submodule(layout.q).out_features // head_dim // n_kv
        mlp = _count(cfg.mlp_fraction, inter, "mlp_fraction", "MLP channels")
        if cfg.head_unit == "query":
            heads = _count(cfg.head_fraction, n_rep, "head_fraction", "query heads of each KV group",
                           "" if n_rep > 1 else "; with one query head per KV head, use head_unit: group")
        else:
            heads = _count(cfg.head_fraction, n_kv, "head_fraction", "KV groups")
        return mlp, heads

    def _prune(self, block: nn.Module, prefix: str, stats: dict[str, Any]) -> None:
        cfg = self.config
        config = block_config(block)
        layout = layout_of_config(config, "prune_structured", kind="gated-MLP")
        _check_block(block, layout, prefix)
        head_dim = attention_head_dim(block.get_submodule(layout.attention), config)
        mlp_remove, head_remove = self._removals(block, layout, head_dim)
        sizes: dict[str, int] = {}
        if cfg.mlp_fraction > 0:
            down = block.get_submodule(layout.down)
            inter, remove = down.in_features, mlp_remove
            acc = stats.get(layout.down)
            if cfg.score == "activation" and acc is None:
                raise ValueError(f"{prefix}.{layout.down} saw no calibration input: cannot score its channels")
            scores = mlp_channel_scores(block.get_submodule(layout.gate).weight, block.get_submodule(layout.up).weight,
                                        down.weight, acc.norms if acc is not None else None)
            remove_mlp_channels(block, layout, keep_indices(scores, remove))
            sizes["intermediate_size"] = inter - remove
        if cfg.head_fraction > 0:
            n_q = block.get_submodule(layout.q).out_features // head_dim
            n_kv = block.get_submodule(layout.k).out_features // head_dim
            n_rep = n_q // n_kv
            acc = stats.get(layout.o)
            if cfg.score == "activation" and acc is None:
                raise ValueError(f"{prefix}.{layout.o} saw no calibration input: cannot score its heads")
            cov = acc.cov if acc is not None else None
            o_weight = block.get_submodule(layout.o).weight
            if cfg.head_unit == "query":
                keep_q = keep_indices(head_scores(o_weight, head_dim, cov), head_remove, groups=n_kv)
                keep_kv = torch.arange(n_kv)
            else:
                keep_kv = keep_indices(head_scores(o_weight, n_rep * head_dim, cov), head_remove)
                keep_q = (keep_kv[:, None] * n_rep + torch.arange(n_rep)[None, :]).flatten()
            remove_heads(block, layout, keep_q, keep_kv, head_dim)
            sizes.update(num_heads=len(keep_q), num_kv_heads=len(keep_kv), head_dim=head_dim)
        changed = set_config_shapes(config, **sizes)
        if changed:  # the first block; later blocks match
            log.info("prune_structured (%s score): config now %s", cfg.score, changed)
        log.debug("prune_structured %s: %s", prefix, sizes)
