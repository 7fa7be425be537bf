"""Real-model checks on SmolLM2-135M (fixture built once into ~/.cache/compressor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.api import load_model, load_tokenizer
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def test_w4_g32_affine_grid_reproduces_weights_exactly(smollm2_path):
    """SmolLM2 came from GGUF Q4_1 (x = min + d*q per 32 weights): RTN W4 g32 on that grid is lossless."""
    model = load_model(smollm2_path)
    exact = QuantScheme(bits=4, group_size=32, zero_point="float")
    integer = QuantScheme(bits=4, group_size=32)
    worst_exact, worst_int = 0.0, 0.0
    for _, m in _linears(model):
        w = m.weight.data
        worst_exact = max(worst_exact, (fake_quant(w, compute_qparams(w, exact), exact) - w).abs().max().item())
        worst_int = max(worst_int, (fake_quant(w, compute_qparams(w, integer), integer) - w).abs().max().item())
    assert worst_exact == 0.0
    # an integer zero point cannot express Q4_1's float minimum: the grid is shifted by up to half a step
    assert worst_int > 0.0


def test_export_reload_bit_exact(smollm2_path, tmp_path):
    model = load_model(smollm2_path)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 128}}}]})  # ragged: 576 = 4*128 + 64
    compress(model, recipe, quiet=True)
    x = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    out = save_compressed(model, tmp_path / "e", tokenizer=load_tokenizer(smollm2_path), recipe=recipe)
    del model
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(x).logits, ref)


@pytest.mark.slow
def test_perplexity_reproduces_reference_numbers(smollm2_path, tmp_path):
    """fp32 23.07 and RTN W4 g64 asymmetric 29.51 (DESIGN.md protocol), reloaded export equal to 4 digits."""
    from compressor import evaluate

    tok = load_tokenizer(smollm2_path)
    fp32 = evaluate(smollm2_path, quiet=True).ppl
    assert fp32 == pytest.approx(23.07, rel=0.01)
    model = load_model(smollm2_path)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 64}}}]})
    compress(model, recipe, quiet=True)
    w4 = evaluate(model, tokenizer=tok, quiet=True).ppl
    assert w4 == pytest.approx(29.51, rel=0.01)
    out = save_compressed(model, tmp_path / "e", tokenizer=tok, recipe=recipe)
    del model
    assert round(evaluate(out, quiet=True).ppl, 4) == round(w4, 4)


@pytest.mark.slow
def test_transformers_loads_symmetric_smollm2_export(smollm2_path, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = load_model(smollm2_path)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 64, "symmetric": True}}}]})
    compress(model, recipe, quiet=True)
    x = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    del model
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref, rtol=0, atol=1e-4)
