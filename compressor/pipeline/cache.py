"""Activation cache of the sequential pipeline: block inputs per calibration batch.

Hidden states change after every block; the keyword arguments a block needs
(attention mask, position ids, rotary embeddings) are captured once per batch
and reused. Hidden states live on the compute device, on CPU, or on disk.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["ActivationCache", "to_device", "select_rows", "CACHE_LOCATIONS"]

CACHE_LOCATIONS = ("device", "cpu", "disk")


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``fn`` applied to every tensor inside nested tuples / lists / dicts; everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, v) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(fn, v) for v in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to ``device``."""
    return map_tensors(lambda t: t.to(device), obj)


def select_rows(kwargs: dict, rows: torch.Tensor, batch: int) -> dict:
    """Select ``rows`` of every batch-sized tensor in a block's keyword arguments.

    Args:
        kwargs: a block's cached keyword arguments (masks, position embeddings, ...).
        rows: (R,) int64 indices into the batch.
        batch: the batch size of the cached hidden states; tensors whose first
            dimension equals it (and tuples of them) are indexed, others kept.
    """
    def pick(v):
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch and batch > 1:
            return v[rows.to(v.device)]
        if isinstance(v, tuple):
            return tuple(pick(t) for t in v)
        return v
    return {k: pick(v) for k, v in kwargs.items()}


class ActivationCache:
    """Per-batch block inputs: hidden states (B, L, H) plus the block's keyword arguments.

    Args:
        location: ``"device"`` (keep on the compute device), ``"cpu"``, or ``"disk"``.
        device: the compute device.
        directory: where ``"disk"`` stores tensors (a temporary directory by default).
    """

    def __init__(self, location: str, device: torch.device | str, directory: Path | None = None):
        if location not in CACHE_LOCATIONS:
            raise ValueError(f"activation cache location {location!r}: use one of {CACHE_LOCATIONS}")
        self.location, self.device = location, torch.device(device)
        self._own_dir = location == "disk" and directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="compressor-acts-")) if self._own_dir else directory
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._hidden: list[torch.Tensor | Path] = []
        self._kwargs: list[dict] = []

    def __len__(self) -> int:
        return len(self._hidden)

    def _store(self, i: int, hidden: torch.Tensor) -> torch.Tensor | Path:
        if self.location == "disk":
            path = self.directory / f"hidden_{i:05d}.pt"
            torch.save(hidden.detach().cpu(), path)
            return path
        return hidden.detach().to(self.device if self.location == "device" else "cpu")

    def append(self, hidden: torch.Tensor, kwargs: dict) -> None:
        """Add a batch: hidden (B, L, H) and the block's keyword arguments."""
        self._hidden.append(self._store(len(self._hidden), hidden))
        self._kwargs.append(to_device(kwargs, self.device if self.location == "device" else "cpu"))

    def hidden(self, i: int) -> torch.Tensor:
        """Hidden states of batch ``i`` on the compute device."""
        h = self._hidden[i]
        if isinstance(h, Path):
            h = torch.load(h, weights_only=True)
        return h.to(self.device)

    def kwargs(self, i: int) -> dict:
        return to_device(self._kwargs[i], self.device)

    def set_hidden(self, i: int, hidden: torch.Tensor) -> None:
        """Replace batch ``i``'s hidden states (the next block's inputs)."""
        self._hidden[i] = self._store(i, hidden)

    def copy(self) -> "ActivationCache":
        """An independent cache with the same entries (a second activation stream)."""
        other = ActivationCache(self.location, self.device, None)
        for i in range(len(self)):
            other._hidden.append(other._store(i, self.hidden(i)))
        other._kwargs = list(self._kwargs)  # never mutated, safe to share
        return other

    def close(self) -> None:
        """Delete on-disk tensors this cache created."""
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
