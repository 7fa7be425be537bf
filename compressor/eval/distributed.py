"""Data-parallel evaluation under ``accelerate launch``: split work items over processes, gather in order.

Outside a multi-process launch every helper is the identity (one process, rank 0) and
accelerate's process state is never created, so nothing here changes a plain run.
Under ``accelerate launch --multi_gpu --num_processes N`` each process takes a
contiguous slice of the items (:func:`compressor.core.distributed.share`) and
:func:`gather_in_order` concatenates the per-process lists in rank order, which
is item order. With no CUDA device (or ``ACCELERATE_USE_CPU=1``) the processes
run on CPU and communicate over gloo.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from compressor.core.distributed import is_main, share

__all__ = ["gather_in_order", "is_main_process", "num_processes", "process_device", "split_for_process"]

log = logging.getLogger(__name__)

_WORLD_VARS = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


def _state():
    """accelerate's ``PartialState`` in a multi-process launch (or once something created it), else None."""
    from accelerate import PartialState
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    if not PartialState._shared_state and get_int_from_env(_WORLD_VARS, 1) <= 1:
        return None
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def num_processes() -> int:
    """How many processes share the evaluation (1 outside ``accelerate launch``)."""
    state = _state()
    return state.num_processes if state is not None else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single-process run): the process that logs and writes reports."""
    _state()  # joins the launch's process group, if there is one
    return is_main()


def process_device() -> torch.device | None:
    """This process's device in a multi-process launch (``cuda:<local rank>`` or ``cpu``); None otherwise."""
    state = _state()
    return state.device if state is not None and state.num_processes > 1 else None


def split_for_process(items: Sequence[Any]) -> list[Any]:
    """This process's contiguous share of ``items``: all of them in one process.

    Shares follow rank order and differ in length by at most one; a process may get
    none when there are fewer items than processes.
    """
    state = _state()
    items = list(items)
    if state is None or state.num_processes == 1:
        return items
    part = items[share(len(items))]  # the same split as the compression's calibration shares
    log.debug("process %d of %d takes %d of %d items", state.process_index, state.num_processes, len(part), len(items))
    return part


def gather_in_order(share: list[Any]) -> list[Any]:
    """Concatenate every process's ``share`` in rank order; the same list on every process.

    Each element must be picklable (numbers, tuples, CPU tensors). Use it with
    :func:`split_for_process` so the result is in the original item order.
    """
    state = _state()
    if state is None or state.num_processes == 1:
        return list(share)
    from accelerate.utils import gather_object

    return list(gather_object(share))
