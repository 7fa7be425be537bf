"""Network-output distortion of pruning one decoder block at a time.

The rate-distortion allocation of Xu et al. (ICCV 2023, "Efficient Joint
Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks")
measures, for every layer and candidate sparsity, the distortion of the
*network's output* when that layer alone is pruned, and relies on these
distortions adding up. :func:`output_distortion` measures exactly that on a
causal LM, with a decoder block as the unit, through the shared probe
:func:`compressor.algorithms.allocate.unit_distortion` (which re-runs only the
blocks from the pruned one onwards). Unlike the sequential pipeline, this runs
the whole model where it lives (it is a planning step on the dense model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from compressor.algorithms.allocate import unit_distortion
from compressor.core.arch import find_blocks

__all__ = ["output_distortion"]


def output_distortion(
    model: nn.Module,
    input_ids: torch.Tensor,
    grid: Sequence[float],
    masks: Callable[[int, float], list[tuple[nn.Module, torch.Tensor]]],
    *,
    batch_size: int = 2,
    quiet: bool = False,
) -> torch.Tensor:
    """KL of the model's output when one block alone is pruned, for every block and sparsity.

    Args:
        model: a dense Hugging Face causal LM (left unchanged on return).
        input_ids: (S, T) int64 probe sequences.
        grid: (C,) candidate sparsities.
        masks: ``masks(i, s)`` gives the modules of block ``i`` to prune at
            sparsity ``s`` and their (N, K) bool keep-masks (True = kept).
        batch_size: probe sequences per forward.
        quiet: no progress bar.

    Returns:
        (L, C) float64 distortions: mean over probe tokens of
        KL(dense || pruned), in nats; 0 where the mask keeps everything.
    """
    _, blocks = find_blocks(model)
    grid = list(grid)

    def pruned(i: int, c: int) -> list[tuple[nn.Module, torch.Tensor]]:
        if grid[c] <= 0:
            return []
        return [(m, m.weight.data * keep.to(m.weight.device, m.weight.dtype)) for m, keep in masks(i, grid[c])]

    return unit_distortion(model, input_ids, range(len(blocks)), len(grid), pruned, batch_size=batch_size,
                           quiet=quiet, label="dp probe")
