"""The Triton kernels compile for sm_90 (H100/H200) on this CPU machine, through ptxas to a cubin.

The interpreter tests prove the arithmetic; this proves Triton's compiler takes
the kernels (layouts, types, lowering) for every path and a spread of bit
widths, zero-point modes, group shapes and dtypes, and the online Hadamard
kernel at real model sizes, which the interpreter cannot see. Runs ``python -m tests.test_kernels._compile_sm90`` in a fresh process with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists():
        pytest.skip("this triton build ships no ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-m", "tests.test_kernels._compile_sm90"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    had = [r for r in lines if r["kernel"] == "hadamard"]
    floats = [r for r in lines if r["kernel"] == "float_gemm"]
    assert sorted(r["fmt"] for r in floats) == [0, 0, 1, 2]  # FP8 per channel and in blocks, NVFP4, MXFP4
    assert all(r["stack"] == 0 for r in floats), floats  # 8 warps, one scale per K tile: no spills
    lines = [r for r in lines if r["kernel"] not in ("hadamard", "float_gemm")]
    assert [r["n"] for r in had] == [576, 1536, 4096, 14336, 96]
    assert all(r["stack"] == 0 for r in had), had  # the Hadamard kernel stays in registers too
    assert {(r["kernel"], r["bits"]) for r in lines} == {
        (k, b) for k in ("decode_gemv", "decode_dot", "gemm", "dequant") for b in (2, 3, 4, 8)
    }
    headline = {r["kernel"]: r for r in lines if r["bits"] == 4}
    # the W4 g128 fp16 paths fit in registers: no local-memory spills
    assert all(headline[k]["stack"] == 0 for k in ("decode_gemv", "decode_dot", "gemm", "dequant")), headline
