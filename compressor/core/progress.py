"""Progress bars: tqdm, silent with ``quiet=True`` or when stderr is not a terminal."""

from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["progress"]


def progress(iterable: Iterable[T], desc: str, *, quiet: bool = False, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar; ``disable=None`` lets tqdm hide it off a TTY."""
    return tqdm(iterable, desc=desc, total=total, disable=True if quiet else None, leave=False, dynamic_ncols=True)
