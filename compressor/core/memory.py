"""Host memory hygiene: give the C heap's freed pages back to the operating system.

glibc keeps the pages of freed blocks in its arenas, so a process's resident set stays at its high-water
mark after large temporary allocations (a tokenizer's encoding of a whole corpus, a freed decoder block)
until something asks for the pages back. A streamed compression bounds its resident set by calling
:func:`trim_heap` after such steps.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["trim_heap"]


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim(0)``; a no-op elsewhere).

    Measured here: tokenizing the 1790-1999 State of the Union text left ~0.9 GB of freed heap resident,
    and a streamed 1B-shape run grew by ~100 MB per block without a trim after each block.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
