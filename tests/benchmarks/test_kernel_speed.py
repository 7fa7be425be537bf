"""benchmarks/kernel_speed.py: refuses to run without CUDA; its model quantizer swaps in working QuantLinears."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import load_benchmark, tiny_llama


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("kernel_speed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_cleanly_without_cuda(bench, caplog):
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in caplog.text


def test_quantize_model_replaces_linears(bench):
    from compressor.runtime.quant_linear import QuantLinear

    model = tiny_llama()
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        stored = bench._quantize_model(model, bench.common.Setting(8, 32))
        out = model(ids).logits  # CPU: the reference backend
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear) and stored > 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_decode_loop_follows_greedy_generation(bench):
    # the timed loop decodes with a static cache whose positions come from its own on-device length:
    # its first tokens must be the greedy tokens of plain full-sequence forwards
    model = tiny_llama(vocab=96, layers=2, seed=3)
    tps, mode, first = bench._decode_tps(model, prompt=6, steps=4)
    assert mode == "eager" and tps > 0
    seq = torch.randint(0, 96, (1, 6), generator=torch.Generator("cpu").manual_seed(0))
    want = []
    with torch.no_grad():
        for _ in range(len(first)):
            tok = model(seq).logits[:, -1:].argmax(-1)
            want.append(int(tok))
            seq = torch.cat([seq, tok], dim=1)
    assert first == want


def test_rel_err_is_relative_and_unrounded(bench):
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    assert bench.rel_err(torch.tensor([3.0, 4.0], dtype=torch.float16), ref) == 0.0
    assert bench.rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1, rel=1e-12)
    assert bench.rel_err(ref + 1 / 3, ref) == pytest.approx((2 / 9) ** 0.5 / 5, rel=1e-12)
    assert bench.rel_err(ref * (1 + 1.0004e-3), ref) > 1e-3  # the 1e-3 check sees the unrounded error
    assert bench.rel_err(torch.ones(2), torch.zeros(2)) > 1e29  # zero reference: no division by zero
