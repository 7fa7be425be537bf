"""Pruning: scores (magnitude, Wanda), masks (unstructured, N:M), SparseGPT and the ``prune`` pass."""

from compressor.prune.masks import parse_structure, prune_count, select_mask
from compressor.prune.scores import InputNormAccumulator, magnitude_scores, wanda_scores
from compressor.prune.sparsegpt import PruneResult, sparsegpt_prune
from compressor.prune.state import attach_mask, is_pruned, prune_mask

__all__ = [
    "InputNormAccumulator",
    "PruneResult",
    "attach_mask",
    "is_pruned",
    "magnitude_scores",
    "parse_structure",
    "prune_count",
    "prune_mask",
    "select_mask",
    "sparsegpt_prune",
    "wanda_scores",
]
