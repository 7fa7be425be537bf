"""Choose the dequantize-matmul implementation for a device.

``backend="auto"`` takes the fastest implementation available for the input's
device; an explicit backend that cannot run raises instead of falling back.
Only the torch reference exists in this release; Triton kernels plug in here.
"""

from __future__ import annotations

import torch

from compressor.kernels import reference

__all__ = ["BACKENDS", "resolve_backend", "dequant_matmul"]

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Name of the implementation that will run for ``backend`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {BACKENDS}")
    if backend == "triton":
        raise RuntimeError(
            "backend='triton' was requested but no Triton dequant-matmul kernel is available "
            "in this build; use backend='auto' or 'reference'"
        )
    return "reference"


def dequant_matmul(x: torch.Tensor, *args, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Dispatch to :func:`compressor.kernels.reference.dequant_matmul` (same arguments)."""
    resolve_backend(backend, x.device)
    return reference.dequant_matmul(x, *args, **kwargs)
