"""llama.cpp block formats (compressor.core.gguf_blocks) against the reader llama.cpp ships (``gguf.quants``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.core import gguf_blocks as gb

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

GEN = torch.Generator().manual_seed(0)


def _random_params(fmt, rows=3, blocks=2):
    r = lambda lo, hi, *shape: torch.randint(lo, hi, shape, generator=GEN)  # noqa: E731
    d = (torch.rand(rows, blocks, generator=GEN) * 0.01 + 1e-4).half()
    if fmt is gb.Q8_0:
        return gb.Q8Params(d, r(-127, 128, rows, blocks, 32).to(torch.int8))
    if fmt is gb.Q4_K:
        dmin = (torch.rand(rows, blocks, generator=GEN) * 0.01).half()
        return gb.Q4KParams(d, dmin, r(0, 64, rows, blocks, 8).to(torch.uint8), r(0, 64, rows, blocks, 8).to(torch.uint8),
                            r(0, 16, rows, blocks, 8, 32).to(torch.uint8))
    return gb.Q6KParams(d, r(-128, 128, rows, blocks, 16).to(torch.int8), r(0, 64, rows, blocks, 16, 16).to(torch.uint8))


@pytest.mark.parametrize("fmt", [gb.Q8_0, gb.Q4_K, gb.Q6_K], ids=lambda f: f.name)
def test_format_constants_are_ggmls(fmt):
    qtype = GGMLQuantizationType[fmt.name]
    assert int(qtype) == fmt.ggml_type and GGML_QUANT_SIZES[qtype] == (fmt.block, fmt.nbytes)


@pytest.mark.parametrize("fmt", [gb.Q8_0, gb.Q4_K, gb.Q6_K], ids=lambda f: f.name)
def test_gguf_reads_our_bytes_as_our_weights(fmt):
    """Every field at every position: random codes, scales and mins, encoded by us, decoded by gguf, bit-exact."""
    p = _random_params(fmt)
    raw = gb.encode(fmt, p)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 2 * fmt.nbytes)
    theirs = gguf_quants.dequantize(raw.numpy(), GGMLQuantizationType[fmt.name])
    ours = gb.dequantize(fmt, p)
    assert ours.shape == (3, 2 * fmt.block)
    assert np.array_equal(theirs, ours.numpy())


@pytest.mark.parametrize("fmt", [gb.Q8_0, gb.Q4_K, gb.Q6_K], ids=lambda f: f.name)
def test_rtn_codes_stay_in_range_and_round_to_the_grid(fmt):
    w = torch.randn(4, 512, generator=GEN) * 0.02
    w[0, :256] = 0.0  # an all-zero block: no division by zero, dequantizes to zeros
    p = gb.rtn(fmt, w)
    back = gb.dequantize(fmt, p)
    assert torch.equal(back[0, :256], torch.zeros(256))
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < {"Q8_0": 0.01, "Q6_K": 0.03, "Q4_K": 0.12}[fmt.name]
    lo, hi = {"Q8_0": (-127, 127), "Q4_K": (0, 15), "Q6_K": (0, 63)}[fmt.name]
    assert int(p.q.min()) >= lo and int(p.q.max()) <= hi
    # nearest grid point: no neighbouring code inside the grid is closer to the weight
    err = (back - w).abs()
    for by in (-1, 1):
        q = p.q.to(torch.int32) + by
        inside = ((q >= lo) & (q <= hi)).reshape(back.shape)
        other = (gb.dequantize(fmt, type(p)(**{**p.__dict__, "q": q})) - w).abs()
        assert (err[inside] <= other[inside] + 1e-7).all()


def test_q8_0_rtn_is_no_worse_than_llama_cpps_reference_quantizer():
    """ggml rounds with the unrounded scale; we round against the fp16 scale actually stored: never worse."""
    w = torch.randn(8, 1024, generator=GEN)
    ours = gb.dequantize(gb.Q8_0, gb.rtn(gb.Q8_0, w))
    raw = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    theirs = torch.from_numpy(gguf_quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    assert (ours - w).norm() <= (theirs - w).norm() * 1.0001


def test_rows_that_do_not_fill_blocks_and_nan_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        gb.rtn(gb.Q4_K, torch.randn(2, 300))
    bad = torch.randn(2, 256)
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gb.rtn(gb.Q6_K, bad)
