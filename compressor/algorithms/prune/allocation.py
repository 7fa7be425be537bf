"""Where to prune: a sparsity per layer under one global budget.

Pure functions. Each returns one sparsity (fraction pruned) per layer such that
the parameter-weighted mean is the target, so the model as a whole loses the
same number of weights as uniform pruning would:

* :func:`uniform` - every layer at the target;
* :func:`global_magnitude` - one |W| threshold over all layers;
* :func:`lamp` - one threshold on LAMP scores (Lee et al., arXiv 2010.07611);
* :func:`owl` - outlier-weighted layerwise sparsity (Yin et al., arXiv 2310.05175):
  blocks with more activation outliers keep more weights;
* :func:`rate_distortion` - the allocation of "Efficient Joint Optimization of
  Layer-Adaptive Weight Pruning in Deep Neural Networks" (Xu et al., CVPR 2023):
  with distortion additive over layers, the per-layer choice minimising the
  summed distortion under the budget is a knapsack, solved exactly by dynamic
  programming over a grid of candidate sparsities
  (:func:`compressor.algorithms.allocate.choose`, shared with bit allocation).

The statistics (weights, outlier ratios, distortion curves) come from the
``prune`` pass (:mod:`compressor.passes.prune`); nothing here knows a model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from compressor.algorithms.allocate import choose
from compressor.algorithms.prune.masks import check_sparsity

__all__ = [
    "ALLOCATIONS",
    "achieved_sparsity",
    "global_magnitude",
    "lamp",
    "lamp_scores",
    "outlier_ratio",
    "owl",
    "rate_distortion",
    "uniform",
]

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global", "lamp", "owl", "dp")
MAX_LAYER_SPARSITY = 0.99  # no layer is emptied: a layer with no weights left breaks the signal path


def uniform(sizes: Sequence[int], target: float) -> list[float]:
    """Every layer pruned at ``target``.

    Args:
        sizes: number of weights of each layer.
        target: fraction pruned, in [0, 1).
    """
    check_sparsity(target)
    return [float(target)] * len(sizes)


def achieved_sparsity(sizes: Sequence[int], sparsities: Sequence[float]) -> float:
    """Parameter-weighted mean sparsity: the fraction of all weights pruned."""
    total = sum(sizes)
    if total == 0:
        raise ValueError("no weights: the allocation has no layers")
    return sum(n * s for n, s in zip(sizes, sparsities)) / total


def _by_threshold(scores: Sequence[torch.Tensor], target: float) -> list[float]:
    """Per-layer fraction of scores under the global ``target``-quantile of all scores."""
    check_sparsity(target)
    flat = torch.cat([s.reshape(-1).float() for s in scores])  # (sum n_l,)
    count = int(target * flat.numel())
    if count == 0:
        return [0.0] * len(scores)
    # the ``count`` lowest scores are pruned: rank instead of thresholding so ties cannot over-prune
    order = torch.argsort(flat, stable=True)[:count]
    layer_of = torch.repeat_interleave(torch.arange(len(scores)), torch.tensor([s.numel() for s in scores]))
    pruned = torch.bincount(layer_of[order], minlength=len(scores))
    return [min(MAX_LAYER_SPARSITY, int(p) / s.numel()) for p, s in zip(pruned, scores)]


def global_magnitude(weights: Sequence[torch.Tensor], target: float) -> list[float]:
    """Prune the ``target`` fraction of smallest |W| over all layers together.

    Args:
        weights: each layer's weight, any shape, float.
        target: fraction of all weights pruned, in [0, 1).

    Returns:
        one sparsity per layer.
    """
    return _by_threshold([w.detach().abs() for w in weights], target)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight (Lee et al., arXiv 2010.07611, eq. 3).

    With the layer's weights sorted by magnitude, ascending, weight ``u`` scores
    ``w_u^2 / sum_{v >= u} w_v^2``: its squared magnitude relative to itself
    and every larger weight of the same layer. The largest weight of each layer
    scores 1, so a global threshold never empties a layer.

    Args:
        weight: one layer's weight, any shape, float.

    Returns:
        float32 scores of the same shape.
    """
    sq = weight.detach().float().reshape(-1) ** 2  # (n,)
    order = torch.argsort(sq, stable=True)
    sorted_sq = sq[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq.double(), (0,)), 0), (0,))  # sum over v >= u
    scores = torch.empty_like(sq)
    scores[order] = (sorted_sq.double() / tail.clamp_min(torch.finfo(torch.float64).tiny)).float()
    return scores.reshape(weight.shape)


def lamp(weights: Sequence[torch.Tensor], target: float) -> list[float]:
    """LAMP allocation: one global threshold on :func:`lamp_scores`.

    Args:
        weights: each layer's weight, float.
        target: fraction of all weights pruned, in [0, 1).

    Returns:
        one sparsity per layer.
    """
    return _by_threshold([lamp_scores(w) for w in weights], target)


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float = 5.0) -> float:
    """OWL's layerwise outlier distribution (LOD) of one block (arXiv 2310.05175, Sec. 3.2).

    The fraction of a block's Wanda scores ``|W_ij| ||X_j||`` that exceed
    ``threshold`` times the mean score, over all the block's linears together.

    Args:
        scores: Wanda scores of each linear of the block, (N_l, K_l) float.
        threshold: the paper's M (5 for LLaMA-7B; 3-10 explored).

    Returns:
        the outlier fraction, in [0, 1].
    """
    if threshold <= 0:
        raise ValueError(f"threshold={threshold}: OWL's M is a positive multiple of the mean score, e.g. 5")
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl(ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL allocation: density proportional to each block's outlier ratio.

    The ratios are scaled linearly onto a range of width ``2 * lam`` and centred
    so the mean density is ``1 - target`` (arXiv 2310.05175, Sec. 3.3): the
    block with most outliers is pruned at ``target - lam``, the one with fewest
    at ``target + lam`` (before clamping to [0, 0.99]). Blocks are assumed equal
    in size, as in the decoder stacks OWL was designed for.

    Args:
        ratios: one outlier ratio per block (:func:`outlier_ratio`).
        target: mean sparsity, in [0, 1).
        lam: the paper's lambda, half the width of the sparsity range (0.08 for LLaMA-7B).

    Returns:
        one sparsity per block.
    """
    check_sparsity(target)
    if not 0 <= lam < 1:
        raise ValueError(f"lam={lam}: OWL's lambda is a sparsity offset in [0, 1), e.g. 0.08")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        raise ValueError("owl needs at least one block")
    spread = r.max() - r.min()
    density = torch.zeros_like(r) if spread == 0 else (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - target)
    return [min(MAX_LAYER_SPARSITY, max(0.0, 1 - float(d))) for d in density]


def rate_distortion(
    distortion: torch.Tensor,
    grid: Sequence[float],
    sizes: Sequence[int],
    target: float,
    resolution: int | None = None,
) -> list[float]:
    """Minimise summed distortion under a global budget by dynamic programming.

    Layer ``l`` pruned at grid sparsity ``grid[c]`` costs ``distortion[l, c]``
    and removes ``grid[c] * sizes[l]`` weights. Assuming the model's distortion
    is the sum of the layers' (the additivity of Xu et al., CVPR 2023), the best
    allocation picks one ``c`` per layer minimising ``sum_l distortion[l, c_l]``
    with at least ``target * sum(sizes)`` weights removed: a multiple-choice
    knapsack, solved exactly on a budget discretised into ``resolution`` units
    (each layer's removal rounded down, so the target is always met).

    Args:
        distortion: (L, C) float distortions, finite and non-negative.
        grid: (C,) candidate sparsities, each in [0, 1); must reach the target.
        sizes: (L,) number of weights of each layer.
        target: fraction of all weights pruned, in [0, 1).
        resolution: budget units (default ``max(20000, 200 L)``).

    Returns:
        one sparsity per layer, each from ``grid``.
    """
    check_sparsity(target)
    d = torch.as_tensor(distortion, dtype=torch.float64)
    g = torch.tensor(list(grid), dtype=torch.float64)
    n = torch.tensor(list(sizes), dtype=torch.float64)
    if d.ndim != 2 or d.shape != (len(n), len(g)):
        raise ValueError(f"distortion has shape {tuple(d.shape)}; expected (layers, grid) = ({len(n)}, {len(g)})")
    if not torch.isfinite(d).all() or (d < 0).any():
        raise ValueError("distortion must be finite and non-negative: check the calibration statistics")
    for s in g.tolist():
        check_sparsity(s)
    if g.max() < target:
        raise ValueError(f"grid tops out at {g.max():.3f} < target {target}: add larger candidate sparsities")
    total = float(n.sum())
    units = resolution or max(20000, 200 * len(n))
    need = int(torch.ceil(torch.tensor(target * units)).item())
    removed = torch.floor(g[None, :] * n[:, None] / total * units).long()  # (L, C) budget units removed
    try:
        picks = choose(d, removed, need)
    except ValueError:
        raise ValueError(f"no allocation on this grid reaches sparsity {target}") from None
    return [float(g[c]) for c in picks]
