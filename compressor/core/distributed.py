"""Data-parallel calibration over ``torch.distributed``: which process this is, its share, and the reductions.

A compression launched with ``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N``
runs one process per rank. :func:`init_from_env` joins the default process group that the launcher
described in the environment (gloo on CPU, NCCL on CUDA); every rank then calibrates on its own
contiguous share of the calibration sequences (:func:`share`), the statistics of a block are summed over
the ranks before the block is compressed (:func:`all_reduce_sum`), so every rank compresses the block from
the same numbers, and rank 0 writes the export. Outside such a launch everything here is the identity
(one process, rank 0) and no process group is created.
"""

from __future__ import annotations

import atexit
import logging
import os

import torch

__all__ = ["all_gather_rows", "all_reduce_sum", "barrier", "check_same", "init_from_env", "is_main", "share", "world"]

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 and in a single-process run: the process that writes and reports."""
    return world()[0] == 0


def init_from_env() -> tuple[int, int]:
    """Join the process group a launcher described (``WORLD_SIZE`` > 1 with ``RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``, as torchrun and accelerate set them), once; returns :func:`world`.

    The backend is NCCL when CUDA is available and ``ACCELERATE_USE_CPU`` is not set, else gloo.
    """
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and dist.is_available() and not dist.is_initialized():
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
        dist.init_process_group("gloo" if cpu else "nccl")
        # left to interpreter exit, the group's threads can be torn down while still joinable: the process then
        # aborts ("terminate called without an active exception", SIGABRT) after its work is done
        atexit.register(_leave)
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        log.info("data-parallel calibration: rank %d of %d (%s)", dist.get_rank(), size, dist.get_backend())
    return world()


def _leave() -> None:
    """Destroy the default process group at exit (registered by :func:`init_from_env`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (rank order, lengths differing by at most one)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (the identity in one process); returns ``t``."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    """Every rank's rows of ``t``, concatenated in rank order (``t`` itself in one process).

    Args:
        t: (R, ...) this rank's rows; R may differ between ranks, the other dimensions and the dtype may not.
        what: named in the error.

    Returns:
        (sum of R over the ranks, ...) on ``t``'s device: with the contiguous shares of :func:`share`, the rows
        in the order one process over all the data would have them.

    Raises:
        ValueError: on every rank alike, when some rank has no rows (fewer calibration sequences than ranks).
    """
    size = world()[1]
    if size == 1:
        return t
    import torch.distributed as dist

    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if min(counts) == 0:
        raise ValueError(f"{what}: rank {counts.index(0)} of {size} got no calibration rows; use at least as many "
                         "calibration sequences as processes")
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def check_same(tensors: list[torch.Tensor], what: str) -> None:
    """Raise when ``tensors`` differ between ranks (compared through a float64 checksum of each).

    Every rank compresses a block from the same reduced statistics with the same code, so its weights must
    come out identical; a difference means a rank ran other code or other data, and the export would be
    rank 0's alone without anyone knowing.
    """
    if world()[1] == 1 or not tensors:
        return
    sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors])  # no float64 copies; on their device
    lo, hi = sums.clone(), sums.clone()
    import torch.distributed as dist

    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{what}: the ranks' results differ (checksums {lo.tolist()[:4]} .. {hi.tolist()[:4]}); "
                           "every rank must run the same code, recipe and calibration data")
