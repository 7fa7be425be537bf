"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): one-shot pruning with OBS weight updates.

Columns are processed left to right with the upper Cholesky factor ``U`` of
``(H + lambda I)^-1`` (the machinery GPTQ uses, :mod:`compressor.algorithms.quant.gptq`).
Removing column ``j``'s pruned weights ``w`` moves the still unprocessed
columns by ``-(w / U_jj) U_{j, j:}`` (the OBS update, paper eq. 3 with the
Cholesky rows of Sec. 3.3), so the remaining weights absorb the error. The mask
is chosen adaptively per block of ``block_size`` columns (Sec. 3.4) from the
OBS saliency ``w^2 / [H_F^-1]_jj = w^2 / U_jj^2`` of the already-updated
weights; N:M groups are chosen when their first column is reached (Sec. 3.5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compressor.algorithms.hessian import inverse_cholesky, one_cpu_thread
from compressor.algorithms.prune.masks import SCOPES, check_sparsity, parse_structure, prune_count
from compressor.algorithms.prune.scores import check_weight

__all__ = ["PruneResult", "sparsegpt_prune"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    """Output of :func:`sparsegpt_prune`.

    Attributes:
        weight: (N, K) pruned and updated weight (zeros where ``mask`` is False), in the requested dtype.
        mask: (N, K) bool, True = kept.
        loss: sum of the OBS losses ``w^2 / U_jj^2 / 2`` of the pruned weights.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | str,
    *,
    scope: str = "layer",
    block_size: int = 128,
    dampening: float = 0.01,
    dtype: torch.dtype | None = None,
) -> PruneResult:
    """Prune a weight matrix with SparseGPT.

    Args:
        weight: (N, K) float weight, finite.
        hessian: (K, K) ``2 X^T X / n`` of the layer inputs (float32 or float64),
            e.g. :attr:`compressor.algorithms.hessian.HessianAccumulator.H`.
        sparsity: fraction of weights pruned in [0, 1), or ``"N:M"`` (N kept of
            every M consecutive columns; K must be a multiple of M).
        scope: for a fraction, the comparison group of each block's mask selection:
            ``"layer"`` (the paper: all rows of the block together; the whole
            layer prunes exactly ``floor(s * N * K)``) or ``"row"`` (each row
            prunes exactly ``floor(s * K)``).
        block_size: columns whose mask is chosen together and updated lazily (the paper's B_s = 128).
        dampening: ``lambda`` as a fraction of the mean Hessian diagonal (the paper's 1%).
        dtype: dtype of the returned weight (default ``weight.dtype``).

    Returns:
        :class:`PruneResult`.
    """
    check_weight(weight)
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"shapes do not fit: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the Hessian has NaN/inf entries: check the calibration activations")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening={dampening}: use a fraction in [0, 1), e.g. 0.01")
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: use a positive number of columns, e.g. 128")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: use one of {SCOPES}")
    nm = parse_structure(sparsity) if isinstance(sparsity, str) else None
    if nm is None:
        check_sparsity(sparsity)
    elif weight.shape[1] % nm[1]:
        raise ValueError(f"input width {weight.shape[1]} is not a multiple of M={nm[1]}: N:M needs whole groups; "
                         "add this layer to ignore or use unstructured sparsity")
    return _sparsegpt(weight, hessian, sparsity, nm, scope, block_size, dampening, dtype or weight.dtype)


def _sparsegpt(weight, hessian, sparsity, nm, scope, block_size, dampening, dtype) -> PruneResult:
    n, k = weight.shape
    W = weight.detach().to(torch.float32).clone()  # (N, K)
    H = hessian.detach().to(torch.float32).clone()  # (K, K)
    dead = torch.diag(H) == 0  # inputs that never fire: their weights do not matter, prune them first
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_cholesky(H, dampening)  # (K, K) upper, U^T U = (H + lambda I)^-1
    mask = torch.ones(n, k, dtype=torch.bool, device=W.device)
    loss = torch.zeros(n, device=W.device)
    step = block_size if nm is None else nm[1] * max(1, block_size // nm[1])  # N:M groups never straddle blocks
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].clone()  # (N, B)
        U1 = U[i1:i2, i1:i2]  # (B, B)
        d = torch.diag(U1)  # (B,)
        M1 = mask[:, i1:i2]  # (N, B) view
        Err1 = torch.zeros_like(W1)
        if nm is None:
            _block_mask(W1 ** 2 / d[None, :] ** 2, M1, sparsity, scope, i1, i2)  # OBS saliency, Sec. 3.4
        with one_cpu_thread(W.device):  # thousands of (N,)-sized steps; the products below use every thread
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    sal = W1[:, i : i + nm[1]] ** 2 / d[None, i : i + nm[1]] ** 2  # (N, M) of the updated weights
                    drop = torch.argsort(sal, dim=1, stable=True)[:, : nm[1] - nm[0]]
                    M1[:, i : i + nm[1]].scatter_(1, drop, False)
                w = W1[:, i]  # (N,)
                q = w * M1[:, i]
                loss += (w - q) ** 2 / d[i] ** 2 / 2
                err = (w - q) / d[i]  # (N,)
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # OBS update within the block (eq. 3), in place
                W1[:, i] = q
                Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # deferred update of the later blocks
    W.masked_fill_(~mask, 0.0)
    return PruneResult(weight=W.to(dtype), mask=mask, loss=float(loss.sum()))


def _block_mask(sal: torch.Tensor, mask: torch.Tensor, sparsity: float, scope: str, i1: int, i2: int) -> None:
    """Prune the lowest saliencies of columns [i1, i2) in place in ``mask`` (N, B).

    Counts are cumulative differences (``floor(s * i2) - floor(s * i1)``) so the
    whole row (``scope="row"``) or layer (``"layer"``) ends with exactly ``floor(s * total)`` pruned.
    """
    n = sal.shape[0]
    if scope == "row":
        count = prune_count(i2, sparsity) - prune_count(i1, sparsity)
        mask.scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :count], False)
    else:
        count = prune_count(n * i2, sparsity) - prune_count(n * i1, sparsity)
        flat = torch.argsort(sal.reshape(-1), stable=True)[:count]
        mask[flat // sal.shape[1], flat % sal.shape[1]] = False
