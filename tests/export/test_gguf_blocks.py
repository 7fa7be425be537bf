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
    dmin = (torch.rand(rows, blocks, generator=GEN) * 0.01).half()
    if fmt is gb.Q8_0:
        return gb.Q8Params(d, r(-127, 128, rows, blocks, 32).to(torch.int8))
    if fmt is gb.Q4_0:
        return gb.Q4Params(d, r(0, 16, rows, blocks, 32).to(torch.uint8))
    if fmt is gb.Q5_0:
        return gb.Q5Params(d, r(0, 32, rows, blocks, 32).to(torch.uint8))
    if fmt is gb.Q5_1:
        return gb.Q51Params(d, (dmin.float() - 0.005).half(), r(0, 32, rows, blocks, 32).to(torch.uint8))
    if fmt in (gb.Q2_K, gb.Q4_K, gb.Q5_K):
        subs, smax, qmax = {"Q2_K": (16, 15, 3), "Q4_K": (8, 63, 15), "Q5_K": (8, 63, 31)}[fmt.name]
        return gb.Q4KParams(d, dmin, r(0, smax + 1, rows, blocks, subs).to(torch.uint8),
                            r(0, smax + 1, rows, blocks, subs).to(torch.uint8),
                            r(0, qmax + 1, rows, blocks, subs, 256 // subs).to(torch.uint8))
    if fmt is gb.Q3_K:
        return gb.Q6KParams(d, r(-32, 32, rows, blocks, 16).to(torch.int8), r(0, 8, rows, blocks, 16, 16).to(torch.uint8))
    return gb.Q6KParams(d, r(-128, 128, rows, blocks, 16).to(torch.int8), r(0, 64, rows, blocks, 16, 16).to(torch.uint8))


# relative error of round-to-nearest on Gaussian weights, and the code range, per format
RTN_ERROR = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.06, "Q5_1": 0.05, "Q5_K": 0.06, "Q4_0": 0.12, "Q4_K": 0.12,
             "Q3_K": 0.25, "Q2_K": 0.5}
CODES = {"Q8_0": (-127, 127), "Q4_0": (0, 15), "Q5_0": (0, 31), "Q5_1": (0, 31), "Q2_K": (0, 3), "Q3_K": (0, 7),
         "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (0, 63)}


@pytest.mark.parametrize("fmt", list(gb.FORMATS.values()), ids=lambda f: f.name)
def test_format_constants_are_ggmls(fmt):
    qtype = GGMLQuantizationType[fmt.name]
    assert int(qtype) == fmt.ggml_type and GGML_QUANT_SIZES[qtype] == (fmt.block, fmt.nbytes)


@pytest.mark.parametrize("fmt", list(gb.FORMATS.values()), ids=lambda f: f.name)
def test_gguf_reads_our_bytes_as_our_weights(fmt):
    """Every field at every position: random codes, scales and mins, encoded by us, decoded by gguf, bit-exact."""
    p = _random_params(fmt)
    raw = gb.encode(fmt, p)
    assert raw.dtype == torch.uint8 and raw.shape == (3, 2 * fmt.nbytes)
    theirs = gguf_quants.dequantize(raw.numpy(), GGMLQuantizationType[fmt.name])
    ours = gb.dequantize(fmt, p)
    assert ours.shape == (3, 2 * fmt.block)
    assert np.array_equal(theirs, ours.numpy())


@pytest.mark.parametrize("fmt", list(gb.FORMATS.values()), ids=lambda f: f.name)
def test_rtn_codes_stay_in_range_and_round_to_the_grid(fmt):
    w = torch.randn(4, 512, generator=GEN) * 0.02
    w[0, :256] = 0.0  # an all-zero block: no division by zero, dequantizes to zeros
    p = gb.rtn(fmt, w)
    back = gb.dequantize(fmt, p)
    assert torch.equal(back[0, :256], torch.zeros(256))
    rel = ((back - w).norm() / w.norm()).item()
    assert rel < RTN_ERROR[fmt.name]
    lo, hi = CODES[fmt.name]
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


@pytest.mark.parametrize("fmt", [gb.Q4_0, gb.Q5_0, gb.Q5_1], ids=lambda f: f.name)
def test_32_weight_rtn_matches_llama_cpps_reference_quantizer_in_error(fmt):
    """Q4_0 / Q5_0 as ggml's quantize_row_q*_0_ref do it (signed peak on the lowest code), Q5_1 on [min, max]:
    our error within 1% of gguf's own reference quantizer's."""
    w = torch.randn(8, 1024, generator=GEN)
    ours = gb.dequantize(fmt, gb.rtn(fmt, w))
    raw = gguf_quants.quantize(w.numpy(), GGMLQuantizationType[fmt.name])
    theirs = torch.from_numpy(gguf_quants.dequantize(raw, GGMLQuantizationType[fmt.name]))
    assert (ours - w).norm() <= (theirs - w).norm() * 1.01


@pytest.mark.parametrize("fmt", list(gb.FORMATS.values()), ids=lambda f: f.name)
def test_grid_and_with_codes_describe_the_same_weights(fmt):
    """grid(p): step * q - offset per group is the dequantized weight; with_codes puts any codes back."""
    w = torch.randn(4, 512, generator=GEN) * 0.05
    p = gb.choose(fmt, w)
    g = gb.grid(fmt, p)
    codes = p.q.reshape(4, 512).long()
    lo = g.step.repeat_interleave(g.width, 1) * codes - g.offset.repeat_interleave(g.width, 1)
    assert torch.allclose(lo, gb.dequantize(fmt, p), atol=1e-6, rtol=1e-5)
    other = torch.randint(g.qmin, g.qmax + 1, (4, 512), generator=GEN)
    assert torch.equal(gb.with_codes(fmt, p, other).q.reshape(4, 512).long(), other)
    with pytest.raises(ValueError, match="codes must lie"):
        gb.with_codes(fmt, p, other + (g.qmax - g.qmin + 1))


@pytest.mark.parametrize("fmt", [f for f in gb.FORMATS.values() if f is not gb.Q8_0], ids=lambda f: f.name)
def test_choose_lowers_the_importance_weighted_error(fmt):
    """The scale search never does worse than round-up scales on the weighted error it minimises (the
    super-block rounding of K-quant scales aside, by a margin on heavy-tailed weights)."""
    w = torch.randn(16, 512, generator=GEN) * torch.rand(16, 512, generator=GEN) ** 3
    imp = torch.rand(512, generator=GEN) ** 4 * 10
    def err(p):
        return ((gb.dequantize(fmt, p) - w) ** 2 * imp).sum()
    assert err(gb.choose(fmt, w, imp)) < err(gb.rtn(fmt, w))
    with pytest.raises(ValueError, match="one entry per column"):
        gb.choose(fmt, w, imp[:10])


@pytest.mark.parametrize("fmt", list(gb.FORMATS.values()), ids=lambda f: f.name)
def test_gptq_on_grid_beats_nearest_and_equals_it_without_correlations(fmt):
    from compressor.algorithms.quant.gptq import gptq_on_grid

    x = torch.randn(2048, 256, generator=GEN) @ (torch.eye(256) + 0.2 * torch.randn(256, 256, generator=GEN))
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(32, 256, generator=GEN) * 0.05
    p = gb.choose(fmt, w, H.diagonal())
    g = gb.grid(fmt, p)
    codes, _ = gptq_on_grid(w, H, g)
    assert int(codes.min()) >= g.qmin and int(codes.max()) <= g.qmax

    def out_err(pp):
        d = gb.dequantize(fmt, pp) - w
        return torch.einsum("nk,kl,nl->", d, H, d)

    assert out_err(gb.with_codes(fmt, p, codes)) < 0.8 * out_err(p)
    # uncorrelated inputs: no error feedback between columns, so GPTQ's codes are the nearest ones
    diag = torch.diag(H.diagonal())
    nearest, _ = gptq_on_grid(w, diag, g, dampening=0.0)
    assert torch.equal(nearest, p.q.reshape(32, 256).long())


def test_mix_follows_llama_quantize_for_smollm2_shapes():
    """Q4_K_M for 30 layers of width 576 / 1536 (llama.cpp's llama_tensor_get_type and fallbacks)."""
    mix = lambda role, layer, k, **kw: gb.mix_format("Q4_K_M", role, layer, 30, k, **kw).name  # noqa: E731
    more = [i for i in range(30) if mix("ffn_down", i, 1536) == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert {mix("ffn_down", i, 1536) for i in range(30) if i not in more} == {"Q4_K"}
    assert mix("attn_v", 0, 576) == "Q8_0" and mix("attn_v", 3, 576) == "Q5_0"  # Q6_K / Q4_K fall back at 576
    assert mix("attn_q", 0, 576) == "Q5_0" and mix("ffn_up", 7, 576) == "Q5_0"
    assert mix("token_embd", 0, 576, tied=True) == "Q8_0" and mix("output", 0, 4096) == "Q6_K"
    assert mix("token_embd", 0, 4096) == "Q4_K"
    assert gb.mix_format("Q6_K", "attn_q", 0, 30, 576).name == "Q8_0"
    assert gb.mix_format("F32", "attn_q", 0, 30, 576) is None
    with pytest.raises(ValueError, match="multiple of 32"):
        gb.mix_format("Q8_0", "attn_q", 0, 30, 80)


def test_low_bit_mixes_follow_llama_quantize():
    """Q3_K_M, Q2_K, Q5_K_M, Q4_K_S, Q3_K_L on 32 layers of width 4096 (every K-quant fits) and on SmolLM2's 576
    (the 32-weight fallbacks): llama.cpp's llama_tensor_get_type_impl, dense and not Falcon."""
    def mix(m, role, layer, k=4096, **kw):
        return gb.mix_format(m, role, layer, 32, k, **kw).name

    assert [mix("Q3_K_M", "attn_v", i) for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [mix("Q3_K_M", "ffn_down", i) for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]  # first 32 // 16 layers
    assert mix("Q3_K_M", "attn_output", 9) == "Q4_K" and mix("Q3_K_M", "attn_q", 9) == "Q3_K"
    assert mix("Q3_K_M", "ffn_up", 9) == "Q3_K" and mix("Q3_K_M", "output", 0) == "Q6_K"
    assert mix("Q3_K_M", "token_embd", 0) == "Q3_K"
    assert mix("Q3_K_S", "attn_v", 0) == "Q3_K" and mix("Q3_K_L", "attn_output", 5) == "Q5_K"
    assert mix("Q2_K", "attn_v", 5) == "Q3_K" and mix("Q2_K", "attn_v", 5, gqa=4) == "Q4_K"
    assert mix("Q2_K", "ffn_down", 5) == "Q3_K" and mix("Q2_K", "attn_output", 5) == "Q3_K"
    assert mix("Q2_K", "ffn_gate", 5) == "Q2_K"
    assert mix("Q5_K_M", "ffn_down", 0) == "Q6_K" and mix("Q5_K_M", "ffn_down", 5) == "Q5_K"
    assert mix("Q5_K_S", "ffn_down", 0) == "Q5_K"
    assert [mix("Q4_K_S", "attn_v", i) for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [mix("Q4_K_S", "ffn_down", i) for i in (3, 4)] == ["Q5_K", "Q4_K"]
    # rows of 576: Q2_K / Q3_K fall back to Q4_0, Q5_K to Q5_1
    assert mix("Q3_K_M", "attn_q", 9, 576) == "Q4_0" and mix("Q3_K_M", "attn_v", 0, 576) == "Q5_1"
    assert mix("Q2_K", "ffn_up", 9, 576) == "Q4_0" and mix("Q5_K_M", "attn_q", 9, 576) == "Q5_1"
