"""Shared by the Triton kernel tests: interpreter setup and random packed weights.

Triton decides between compiled and interpreted functions when it is first
imported, so ``TRITON_INTERPRET=1`` must be set before that: tests/conftest.py
does it. A run that overrides it (or imported triton first) skips these tests.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


def interpreter_in_process() -> bool:
    """True when triton's own jit functions are interpreted in this process (or triton is not imported yet)."""
    standard = sys.modules.get("triton.language.standard")
    return standard is None or type(standard.zeros).__name__ == "InterpretedFunction"


# COMPRESSOR_TEST_DEVICE=cuda (with TRITON_INTERPRET=0) runs the same tests on a GPU, compiled:
#   COMPRESSOR_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/test_kernels/test_triton_*.py
DEVICE = torch.device(os.environ.get("COMPRESSOR_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    if not torch.cuda.is_available():
        pytest.skip("COMPRESSOR_TEST_DEVICE=cuda but torch sees no GPU", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") not in ("0", None) or interpreter_in_process():
        pytest.skip("compiled kernel tests need TRITON_INTERPRET=0 set before triton is imported",
                    allow_module_level=True)
else:
    if not interpreter_in_process():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set (tests/conftest.py sets it)",
                    allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel tests need TRITON_INTERPRET=1 on CPU", allow_module_level=True)
pytest.importorskip("triton")

from compressor.core.pack import pack  # noqa: E402
from compressor.kernels.triton import kernels  # noqa: E402
from compressor.core.scheme import QuantScheme  # noqa: E402

if DEVICE.type == "cpu" and type(kernels.decode_kernel).__name__ != "InterpretedFunction":
    pytest.skip("compressor.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


def make_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool, *, dtype=torch.float16,
                float_zp: bool = False, actorder: bool = False, seed: int = 0):
    """Random packed weight: (scheme, packed, scale, zero_point, g_idx) for shape (n, k)."""
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric,
                         zero_point="float" if float_zp else "int")
    width = scheme.group_width(k)
    groups = -(-k // width)
    lo, hi = scheme.qmin, scheme.qmax + 1
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.05 + 0.01).to(dtype)
    if symmetric:
        zp = None
    elif float_zp:
        zp = (torch.randn(n, groups, generator=g) * 0.1).to(dtype)
    else:
        zp = pack(torch.randint(lo, hi, (n, groups), generator=g, dtype=torch.int8), bits, dim=0)
    g_idx = None
    if actorder:
        g_idx = (torch.arange(k) // width)[torch.randperm(k, generator=g)].to(torch.int32)
    return scheme, pack(q, bits, dim=1), scale, zp, g_idx


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def on_device(fn, *args, **kwargs):
    """Call ``fn`` with its tensor arguments moved to ``DEVICE``; a tensor result comes back to the CPU."""
    moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*moved, **kwargs)
    return out.cpu() if isinstance(out, torch.Tensor) else out
