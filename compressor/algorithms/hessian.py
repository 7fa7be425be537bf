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

    def add(self, x: torch.Tensor, fp: torch.Tensor | None = None) -> None:
        """Add a batch of inputs (..., K); non-finite inputs are an error.

        Args:
            x: the compressed model's inputs of the layer.
            fp: the full-precision model's inputs for the same tokens (same shape);
                accumulates :attr:`C` for asymmetric calibration.
        """
        x = x.reshape(-1, x.shape[-1]).to(self._H.device, torch.float32)  # (T, K)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN/inf: check the calibration data and the model weights")
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


def inverse_cholesky(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + lambda I)^-1``, raising lambda until it is positive definite.

    Args:
        H: (K, K) float32 Hessian.
        dampening: ``lambda`` as a fraction of the mean diagonal (raised 10x per failed attempt).

    Returns:
        (K, K) upper-triangular ``U`` with ``U^T U = (H + lambda I)^-1``.

    Memory: one (K, K) float32 matrix besides ``H`` (at K = 14336, 0.8 GB): the factorisations run in place in it.
    """
    mean_diag = torch.diag(H).mean()
    work = torch.empty_like(H, dtype=torch.float32)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(6):
        damp = dampening * (10**attempt) * mean_diag
        work.copy_(H)
        work.diagonal().add_(damp)  # H + lambda I without a (K, K) identity
        torch.linalg.cholesky_ex(work, out=(work, info))  # L, lower
        if info == 0:
            torch.cholesky_inverse(work, out=work)  # (H + lambda I)^-1
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
            if info == 0:
                if attempt:
                    log.warning("Hessian not positive definite; dampening raised to %.3g", dampening * 10**attempt)
                return work
    raise ValueError("the Hessian is not positive definite even with heavy dampening: use more calibration data")
