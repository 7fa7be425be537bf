"""Where the kernels can run: whether triton imports, and whether it interprets kernels on the CPU.

Both the dispatcher and the Triton launchers ask here, so neither imports the other to find out.
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["interpreting", "triton_unavailable"]


@torch.compiler.assume_constant_result  # torch.compile evaluates it once instead of tracing the import
def triton_unavailable() -> str | None:
    """Why the Triton kernels cannot be imported here (a sentence), or None when they can."""
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return f"triton is not installed ({err}); install it with `pip install triton`"
    return None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
