"""Importance scores of individual weights: which ones a mask should keep.

Pure tensor functions. A higher score means "more important, keep". Scores are
compared only inside a comparison group chosen by :func:`compressor.algorithms.prune.masks.select_mask`
(a row, a whole layer, or a group of M consecutive inputs), so any positive
per-layer constant factor in a score is irrelevant.
"""

from __future__ import annotations

import torch

from compressor.core.distributed import all_reduce_sum

__all__ = ["InputNormAccumulator", "check_weight", "input_norms_from_hessian", "magnitude_scores", "wanda_scores"]


def check_weight(weight: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``weight`` is a finite (N, K) matrix."""
    if weight.ndim != 2:
        raise ValueError(f"expected an (N, K) weight matrix, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN/inf entries: fix or reload the checkpoint before pruning")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning score ``|W|``.

    Args:
        weight: (N, K) float weight (any float dtype), finite.

    Returns:
        (N, K) float32 scores.
    """
    check_weight(weight)
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda score ``S_ij = |W_ij| * ||X_j||_2`` (Sun et al., arXiv 2306.11695, eq. 1).

    Args:
        weight: (N, K) float weight, finite.
        input_norms: (K,) float ``||X_j||_2`` of each input feature over the
            calibration tokens, or anything proportional to it (e.g.
            :func:`input_norms_from_hessian`): the paper compares scores within
            one output row, where a common factor cancels.

    Returns:
        (N, K) float32 scores.
    """
    check_weight(weight)
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_norms has shape {tuple(input_norms.shape)}; expected ({weight.shape[1]},), one per input column")
    if not torch.isfinite(input_norms).all() or (input_norms < 0).any():
        raise ValueError("input_norms must be finite and non-negative: check the calibration activations")
    return weight.detach().abs().float() * input_norms.to(weight.device, torch.float32)[None, :]  # (N, K)


def input_norms_from_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` up to a common factor, from a Hessian ``H = 2/n X^T X``.

    ``H_jj = 2/n ||X_j||^2``, so ``sqrt(H_jj)`` is proportional to the column
    norm, which is all :func:`wanda_scores` needs.

    Args:
        hessian: (K, K) float Hessian (e.g. :attr:`compressor.algorithms.hessian.HessianAccumulator.H`).

    Returns:
        (K,) float32.
    """
    return torch.diagonal(hessian).float().clamp_min(0).sqrt()


class InputNormAccumulator:
    """Running ``2/n * sum_x x_j^2`` per input feature, (K,) float32.

    The same normalisation as the diagonal of
    :class:`compressor.algorithms.hessian.HessianAccumulator`, at O(T K) cost and O(K)
    memory instead of O(T K^2) and O(K^2): Wanda needs only the diagonal
    (a (K, K) float32 Hessian of a 70B model's ``down_proj`` is 3.3 GB).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)  # (K,)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of layer inputs (..., K); non-finite inputs are an error."""
        x = x.reshape(-1, x.shape[-1]).to(self.sq.device, torch.float32)  # (T, K)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN/inf: check the calibration data and the model weights")
        t = x.shape[0]
        self.sq *= self.n / (self.n + t)
        self.n += t
        self.sq += (2.0 / self.n) * (x * x).sum(0)

    def all_reduce(self) -> None:
        """Combine the statistics of every rank of a data-parallel calibration into each (in place).

        Each rank holds the mean over its own ``n_r`` tokens; the result is ``sum_r n_r / N * sq_r``, the
        mean over all of them up to float32 summation order (as
        :meth:`compressor.algorithms.hessian.HessianAccumulator.all_reduce`).
        """
        total = int(all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64, device=self.sq.device)).item())
        if total == 0:
            return
        all_reduce_sum(self.sq.mul_(self.n / total))
        self.n = total

    @property
    def norms(self) -> torch.Tensor:
        """(K,) float32 ``sqrt(2/n) ||X_j||_2``."""
        return self.sq.sqrt()
