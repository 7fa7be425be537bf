"""Second-order statistics shared by GPTQ and SparseGPT: the input Hessian and its inverse factor.

``H = 2/n X^T X`` of a linear layer's calibration inputs is what both
second-order methods feed on (GPTQ, arXiv 2210.17323; SparseGPT, arXiv
2301.00774); the upper Cholesky factor of its damped inverse drives their
column sweeps.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from compressor.core.distributed import all_reduce_sum, world

__all__ = ["HessianAccumulator", "inverse_cholesky", "one_cpu_thread"]

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running ``H = 2/n * sum_x x x^T`` over the rows of layer inputs (K, K) float32.

    Wide inputs accumulate only the block rows on and above the diagonal
    (``slab`` columns at a time, about 2/3 of the multiply-adds for K = 1536);
    :attr:`H` mirrors the upper part down when read.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", slab: int = 512):
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.C: torch.Tensor | None = None  # (K, K) 2/n sum (x_fp - x) x^T when full-precision inputs are given
        self.n = 0
        self.slab = slab if in_features > 2 * slab else in_features
        self._mirrored = True

    @property
    def H(self) -> torch.Tensor:
        """(K, K) float32 symmetric Hessian estimate."""
        if not self._mirrored:
            k, b = self._H.shape[0], self.slab
            for i in range(b, k, b):
                self._H[i:, i - b : i] = self._H[i - b : i, i:].t()
            self._mirrored = True
        return self._H

    def all_reduce(self) -> None:
        """Combine the statistics of every rank of a data-parallel calibration into each (in place).

        Each rank holds the mean over its own ``n_r`` tokens; the result is the mean over all of them,
        ``sum_r n_r / N * H_r`` (and the same for :attr:`C`). Equal to one process's accumulation over all
        the tokens up to float32 summation order (the sums are grouped by rank instead of batch by batch).
        """
        n = all_reduce_sum(torch.tensor([float(self.n)], dtype=torch.float64, device=self._H.device))
        total = int(n.item())
        if total == 0:
            return
        has_c = all_reduce_sum(torch.tensor([float(self.C is not None)], device=self._H.device))
        if 0 < int(has_c.item()) < world()[1]:
            raise ValueError("full-precision inputs must come with every rank's batches or none")
        all_reduce_sum(self.H.mul_(self.n / total))  # .H mirrors the upper part down first
        if self.C is not None:
            all_reduce_sum(self.C.mul_(self.n / total))
        self.n = total

    def add(self, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        """Add a batch of inputs (..., K); non-finite inputs are an error.

        Args:
            x: (..., K) the compressed model's inputs of the layer, any float dtype (accumulated in float32).
            fp: the full-precision model's inputs for the same tokens (same shape);
                accumulates :attr:`C` for asymmetric calibration.

        Raises:
            ValueError: ``x`` holds a NaN or inf (seen through H's diagonal once the batch is in), or ``fp`` does
                not pair with ``x``. After the non-finite error the accumulator already holds the bad batch:
                discard it (every caller re-raises and stops the layer).
        """
        x = x.reshape(-1, x.shape[-1]).to(self._H.device, torch.float32)  # (T, K)
        t = x.shape[0]
        self._H *= self.n / (self.n + t)
        if fp is not None:
            fp = fp.reshape(-1, fp.shape[-1]).to(self._H.device, torch.float32)
            if fp.shape != x.shape:
                raise ValueError(f"full-precision inputs {tuple(fp.shape)} do not pair with {tuple(x.shape)}")
            if self.C is None:
                if self.n:
                    raise ValueError("full-precision inputs must come with every batch or none")
                self.C = torch.zeros_like(self._H)
            self.C *= self.n / (self.n + t)
        elif self.C is not None:
            raise ValueError("full-precision inputs must come with every batch or none")
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        if fp is not None:
            self.C.addmm_((fp * (2.0 / self.n) ** 0.5 - x).t(), x)
        k, b = x.shape[1], self.slab
        for i in range(0, k, b):
            self._H[i : i + b, i:].addmm_(x[:, i : i + b].t(), x[:, i:])
        self._mirrored = b >= k
        # a NaN or inf input makes its column's diagonal entry (a sum of squares) NaN or inf: K checks instead of
        # T * K per batch (that full scan cost 3% of a SmolLM2 GPTQ run)
        if not torch.isfinite(self._H.diagonal()).all():
            raise ValueError("calibration activations contain NaN/inf: check the calibration data and the model weights")


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Run the many tiny CPU ops of GPTQ / SparseGPT column sweeps on one thread.

    Thousands of (N,)-sized ops per layer pay the intra-op thread pool's
    synchronisation each time; on a busy 2-core machine that made a 576x1536
    layer take 48 s instead of 1.4 s. Restored on exit.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_cholesky(H: torch.Tensor, dampening: float, perm: torch.Tensor | None = None,
                     chunk: int = 256) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``, raising lambda until it is positive definite.

    Args:
        H: (K, K) float32 Hessian.
        dampening: ``lambda`` as a fraction of the mean diagonal (raised 10x per failed attempt).
        perm: optional (K,) int64 processing order: the factor is that of ``H[perm][:, perm]``, without
            building that permuted copy.
        chunk: rows per step of the in-place permutation, inverse and flip (their temporaries are
            ``chunk x K``).

    Returns:
        (K, K) float32 upper-triangular ``U`` with ``U^T U = (H + lambda I)^-1`` (rows and columns in
        ``perm``'s order).

    How: with ``J`` the order reversal, the lower Cholesky factor ``L`` of ``J (H + lambda I) J`` gives
    ``H + lambda I = R R^T`` with ``R = J L J`` upper-triangular, so ``(H + lambda I)^-1 = R^-T R^-1`` and
    ``U = R^-1 = J L^-1 J`` (the upper factor with a positive diagonal is unique: the same ``U`` as
    Cholesky, inverse, Cholesky again, a third of the flops fewer). ``L^-1`` is formed in place, a block of
    rows at a time, by matrix products on the rows already inverted.

    Memory: one (K, K) float32 matrix besides ``H`` (at K = 14336, 0.8 GB) and ``chunk x K`` temporaries.
    """
    H = H.float()
    k = H.shape[0]
    rev = torch.arange(k - 1, -1, -1, device=H.device) if perm is None else perm.to(H.device).flip(0)
    mean_diag = torch.diag(H).mean()
    work = torch.empty(k, k, dtype=torch.float32, device=H.device)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(6):
        damp = dampening * (10**attempt) * mean_diag
        for a in range(0, k, chunk):  # work = J P (H) P^T J, a block of rows at a time
            torch.index_select(H[rev[a : a + chunk]], 1, rev, out=work[a : a + chunk])
        work.diagonal().add_(damp)  # + lambda I without a (K, K) identity
        # L, lower, the upper triangle zeroed: factored as the upper factor L^T of the column-major view, which
        # LAPACK works on in place (the row-major call copies the whole matrix into a temporary first)
        torch.linalg.cholesky_ex(work.mT, upper=True, out=(work.mT, info))
        if info == 0:
            _invert_lower_in_place(work, chunk)
            _flip_in_place(work, chunk)
            if attempt:
                log.warning("Hessian not positive definite; dampening raised to %.3g", dampening * 10**attempt)
            return work
    raise ValueError("the Hessian is not positive definite even with heavy dampening: use more calibration data")


def _invert_lower_in_place(L: torch.Tensor, chunk: int) -> None:
    """``L`` (K, K) lower-triangular with zeros above the diagonal becomes ``L^-1``, row block by row block:
    ``X_ii = L_ii^-1`` and ``X_i,:i = -X_ii L_i,:i X_:i,:i``, where the rows above are already inverted."""
    k = L.shape[0]
    for i in range(0, k, chunk):
        j = min(i + chunk, k)
        eye = torch.eye(j - i, dtype=L.dtype, device=L.device)
        inv = torch.linalg.solve_triangular(L[i:j, i:j], eye, upper=False)  # (b, b)
        if i:
            left = L[i:j, :i] @ L[:i, :i]  # (b, i): the original rows times the inverted block above
            torch.mm(inv, left, out=L[i:j, :i])
            L[i:j, :i].neg_()
        L[i:j, i:j] = inv


def _flip_in_place(A: torch.Tensor, chunk: int) -> None:
    """``A`` (K, K) becomes ``J A J`` (both orders reversed), swapping blocks of rows from the two ends."""
    k = A.shape[0]
    half = k // 2
    for a in range(0, half, chunk):
        b = min(a + chunk, half)
        top = A[a:b].flip(0, 1)  # a copy
        A[a:b] = A[k - b : k - a].flip(0, 1)
        A[k - b : k - a] = top
    if k % 2:
        A[half] = A[half].flip(0)
