"""Masks from scores: unstructured (per row or per layer) and N:M.

Convention, everywhere in this package:

* a mask is a bool tensor shaped like the weight, ``True`` = weight KEPT,
  ``False`` = weight pruned (set to zero);
* ``sparsity`` is the fraction of weights PRUNED; a comparison group of ``c``
  weights prunes exactly ``prune_count(c, sparsity) = floor(sparsity * c)``;
* ``"N:M"`` means N weights KEPT in every group of M consecutive input columns
  of every row (NVIDIA's 2:4: at most 2 non-zeros in every 4), so ``"2:4"`` and
  ``"4:8"`` are 50% sparse and ``"1:4"`` is 75% sparse. The input width must be
  a multiple of M.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import torch

__all__ = ["SCOPES", "parse_structure", "prune_count", "select_mask", "nm_mask", "is_nm"]

SCOPES = ("row", "layer")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_structure(text: str) -> tuple[int, int]:
    """``"2:4"`` → ``(2, 4)`` (N kept of every M), validated.

    Raises:
        ValueError: not ``"N:M"`` with integers ``0 < N < M``.
    """
    hit = _NM.match(text) if isinstance(text, str) else None
    if hit is None:
        raise ValueError(f"structure={text!r}: write N:M as a string such as '2:4' or '4:8' (N kept of every M)")
    n, m = int(hit.group(1)), int(hit.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure={text!r}: N:M keeps N of every M weights, so it needs 0 < N < M, e.g. '2:4'")
    return n, m


def check_sparsity(sparsity: float) -> None:
    """Raise ``ValueError`` unless ``0 <= sparsity < 1``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity!r}: use the fraction of weights to prune, in [0, 1), e.g. 0.5")


def prune_count(total: int, sparsity: float) -> int:
    """Weights pruned in a comparison group of ``total``: ``floor(sparsity * total)``.

    The fraction is read as the decimal it was written as, so the count is exact
    (``0.29 * 100`` is 28.999999999999996 in floating point; this prunes 29).
    """
    return math.floor(Fraction(repr(float(sparsity))) * total)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (..., count) of the ``count`` smallest scores along the last dim (ties: lower index first)."""
    order = torch.argsort(scores, dim=-1, stable=True)
    return order[..., :count]


def select_mask(scores: torch.Tensor, sparsity: float | str, scope: str = "row") -> torch.Tensor:
    """Keep the highest scores: exact unstructured or N:M masks.

    Args:
        scores: (N, K) float scores, higher = keep; finite.
        sparsity: fraction pruned in [0, 1), or an ``"N:M"`` string (N kept of every M).
        scope: for a fraction: ``"row"`` prunes ``floor(s*K)`` in every row (the
            comparison group of Wanda, arXiv 2306.11695 Sec. 3); ``"layer"`` prunes
            ``floor(s*N*K)`` over the whole matrix (classic magnitude pruning).
            Ignored for N:M.

    Returns:
        (N, K) bool mask, True = kept.
    """
    if scores.ndim != 2:
        raise ValueError(f"expected (N, K) scores, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN/inf: the weight or the calibration statistics are not finite")
    if isinstance(sparsity, str):
        return nm_mask(scores, *parse_structure(sparsity))
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: use one of {SCOPES}")
    n, k = scores.shape
    mask = torch.ones(n, k, dtype=torch.bool, device=scores.device)
    if scope == "row":
        mask.scatter_(1, _lowest(scores, prune_count(k, sparsity)), False)
    else:
        mask.view(-1)[_lowest(scores.reshape(-1), prune_count(n * k, sparsity))] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: in every row, exactly ``n`` of every ``m`` consecutive columns kept.

    Args:
        scores: (N, K) float scores, higher = keep; K a multiple of ``m``.
        n: weights kept per group.
        m: group width.

    Returns:
        (N, K) bool mask, True = kept.
    """
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"input width {k} is not a multiple of M={m}: N:M needs whole groups; "
                         "add this layer to ignore or use unstructured sparsity")
    grouped = scores.reshape(rows, k // m, m)  # (N, K/M, M)
    mask = torch.ones_like(grouped, dtype=torch.bool)
    mask.scatter_(2, _lowest(grouped, m - n), False)
    return mask.reshape(rows, k)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether an (N, K) bool mask keeps exactly ``n`` of every ``m`` consecutive columns in every row."""
    rows, k = mask.shape
    return k % m == 0 and bool((mask.reshape(rows, k // m, m).sum(-1) == n).all())
