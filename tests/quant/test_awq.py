"""AWQ's activation-aware scaling: the fp function is kept, the weight passes after it lose less, refusals."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.quant.awq import awq_scales, quantized_input_error, scaled_error, search_scales
from compressor.core.fake_quant import activation_global_scale, fake_quant_float_per_token
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant
from compressor.passes.awq import _InputStats

IDS = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
HELD = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(5))


def _outlier_llama():
    """A tiny Llama whose norms blow up 4 of 64 channels 20x: the salient input channels AWQ is for."""
    model = tiny_llama(hidden=64, inter=96)
    g = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            w = torch.ones(64)
            w[torch.randperm(64, generator=g)[:4]] = 20.0
            norm.weight.data = w
    return model


def _logits(model, ids=HELD):
    with torch.no_grad():
        return model(ids).logits


def _err(passes):
    ref = _logits(_outlier_llama())
    out = compress(_outlier_llama(), Recipe.from_dict({"passes": passes}), calibration=IDS, quiet=True)
    return ((_logits(out) - ref) ** 2).mean().item()


def test_scales_are_normalised_powers_of_the_activation_means():
    a = torch.tensor([0.5, 2.0, 8.0])
    s = awq_scales(a, 0.5)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    assert torch.allclose(s / s[0], (a / a[0]).double().sqrt())
    assert torch.equal(awq_scales(a, 0.0), torch.ones(3, dtype=torch.float64))


def test_search_never_does_worse_than_no_scaling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g) * torch.tensor([10.0] * 2 + [1.0] * 30)
    H = 2 * x.T @ x / 512
    w = [torch.randn(16, 32, generator=g)]
    scheme = QuantScheme(bits=3, group_size=-1)
    s, alpha, info = search_scales(w, H, x.abs().mean(0), scheme, grid=10)
    assert info["error"] <= info["error_unscaled"] and alpha > 0  # the two big channels earn a finer grid
    assert info["error"] == pytest.approx(scaled_error(w, H, s, scheme))


NVFP4 = {"type": "float", "bits": 4, "group_size": 16, "symmetric": True, "scale_format": "e4m3"}


def test_quantized_input_error_is_the_output_error_with_both_rounded():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g) * torch.tensor([12.0] + [1.0] * 31)
    w = torch.randn(8, 32, generator=g)
    s = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    scheme = QuantScheme(**NVFP4)
    xs = x / s.float()
    xq = fake_quant_float_per_token(xs, "nvfp4", global_scale=activation_global_scale(xs.abs().amax()))
    ws = w * s.float()
    wq = fake_quant(ws, compute_qparams(ws, scheme), scheme)
    want = float(((xq @ wq.T - x @ w.T) ** 2).sum()) / 64
    assert quantized_input_error([w], x, s, scheme, "nvfp4") == pytest.approx(want, rel=1e-6)


def test_search_with_quantized_inputs_moves_an_outlier_channel_into_the_weights():
    """One input channel 50x the others: in NVFP4 its group of 16 rounds the other 15 to zero. The search with
    the inputs rounded too shrinks that channel (alpha > 0) and beats no scaling on that error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g) * torch.tensor([50.0] + [1.0] * 31)
    w = [torch.randn(16, 32, generator=g)]
    scheme = QuantScheme(**NVFP4)
    H = 2 * x.T @ x / 256
    s, alpha, info = search_scales(w, H, x.abs().mean(0), scheme, grid=10, x=x, inputs="nvfp4")
    assert alpha > 0 and info["error"] < 0.8 * info["error_unscaled"]
    assert info["error"] == pytest.approx(quantized_input_error(w, x, s, scheme, "nvfp4"))
    assert s[0] == s.max()  # the outlier channel is divided the most
    with pytest.raises(ValueError, match="sample of the input tokens"):
        search_scales(w, H, x.abs().mean(0), scheme, x=None, inputs="nvfp4")


def test_smoothquant_statistic_divides_max_x_by_max_w():
    """``statistic="max"`` with ``duo_scaling``: SmoothQuant's ``max|x|^alpha / max|w|^(1 - alpha)``, the weight
    maximum taken over every reader's column; the pass feeds it each channel's largest |x|."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g) * torch.tensor([50.0] + [1.0] * 31)
    w = [torch.randn(16, 32, generator=g), 3 * torch.randn(8, 32, generator=g)]
    scheme = QuantScheme(**NVFP4)
    x_max = x.abs().amax(0)
    s, alpha, _ = search_scales(w, 2 * x.T @ x / 256, x_max, scheme, grid=10, duo_scaling=True, x=x,
                                inputs="nvfp4", statistic="max")
    w_max = torch.maximum(w[0].abs().amax(0), w[1].abs().amax(0))
    assert alpha > 0 and torch.equal(s, awq_scales(x_max, alpha, w_max))
    stats = _InputStats(32, torch.device("cpu"))
    for batch in x.split(100):
        stats.add(batch)
    assert torch.equal(stats.abs_max, x_max)
    with pytest.raises(ValueError, match="statistic='median'"):
        search_scales(w, 2 * x.T @ x / 256, x_max, scheme, statistic="median")


def test_tied_channels_share_the_scale_of_their_pooled_statistics():
    """``tie``: inputs 0-3 and 4-7 are copies of producer channels 0-3 (two query heads reading one value head);
    the scales are searched on the pooled statistic and equal on the copies."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g) * torch.tensor([30.0, 1, 1, 1, 10.0, 1, 1, 1])
    w = [torch.randn(16, 8, generator=g)]
    tie = torch.arange(8) % 4
    scheme = QuantScheme(bits=3, group_size=-1)
    act = x.abs().mean(0)
    s, alpha, _ = search_scales(w, 2 * x.T @ x / 256, act, scheme, grid=10, tie=tie)
    assert alpha > 0 and torch.equal(s[:4], s[4:])
    assert torch.equal(s, awq_scales((act[:4] + act[4:]) / 2, alpha)[tie])
    s, alpha, _ = search_scales(w, 2 * x.T @ x / 256, act, scheme, grid=10, tie=tie, statistic="max")
    assert torch.equal(s, awq_scales(torch.maximum(act[:4], act[4:]), alpha)[tie])


def test_the_input_sample_is_a_bounded_uniform_reservoir():
    stats = _InputStats(4, torch.device("cpu"), samples=100)
    rows = torch.arange(4000, dtype=torch.float32)[:, None].expand(4000, 4)
    for batch in rows.split(300):
        stats.add(batch)
    kept = stats.sample[:, 0]
    assert stats.sample.shape == (100, 4) and kept.unique().numel() == 100  # distinct rows of the input
    assert torch.equal(stats.sample, stats.sample[:, :1].expand(100, 4))  # whole rows
    assert 1000 < float(kept.mean()) < 3000 and float(kept.max()) > 3000  # drawn from all of it, not the start
    again = _InputStats(4, torch.device("cpu"), samples=100)
    for batch in rows.split(300):
        again.add(batch)
    assert torch.equal(again.sample, stats.sample)  # seeded
    assert stats.n == 4000 and _InputStats(4, torch.device("cpu")).sample.numel() == 0


def test_awq_with_nvfp4_inputs_keeps_the_function_and_lowers_w4a4_error(tmp_path):
    """Measured on the outlier model (held-out logits MSE, W4A4 NVFP4, GPTQ): 1.4e-3 without AWQ, 8.1e-4 after
    AWQ's search on the weight alone, 8.0e-4 after the search with the inputs rounded too."""
    model = _outlier_llama()
    ref = _logits(model)
    compress(model, Recipe.from_dict({"passes": [{"awq": {"scheme": NVFP4, "inputs": "nvfp4"}}]}),
             calibration=IDS, quiet=True)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=2e-5)
    act = {"quantize_activations": {"format": "nvfp4", "bits": 4}}
    base = _err([act, {"gptq": {"scheme": NVFP4}}])
    recipe = Recipe.from_dict({"passes": [{"awq": {"scheme": NVFP4, "inputs": "nvfp4"}}, act,
                                          {"gptq": {"scheme": NVFP4}}]})
    out = compress(_outlier_llama(), recipe, calibration=IDS, quiet=True)
    assert ((_logits(out) - ref) ** 2).mean().item() < 0.8 * base
    loaded = load_compressed(save_compressed(out, tmp_path / "e", recipe=recipe))
    assert torch.equal(_logits(loaded), _logits(out))


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-grouped-v"])
def test_awq_alone_keeps_the_full_precision_function(family):
    if family.startswith("llama"):
        model = _outlier_llama()
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                             max_position_embeddings=128)).eval()
    ref = _logits(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    grouped = family == "llama-grouped-v"
    compress(model, Recipe.from_dict({"passes": [{"awq": {"scheme": {"bits": 3, "group_size": -1},
                                                          "grouped_v": grouped}}]}),
             calibration=IDS, quiet=True)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=2e-5)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("input_layernorm" in n for n in changed) and any("q_proj" in n for n in changed)
    # qwen3 here has 4 KV heads of 4: v's rows are o's inputs one to one, so v -> o is scaled too; the tiny Llama
    # has 2 KV heads for 4 query heads: v -> o only with grouped_v, each row of v scaling two of o's inputs
    assert any("o_proj" in n for n in changed) == (family != "llama")
    if grouped:
        o = model.model.layers[0].self_attn.o_proj.weight
        ratio = o / before["model.layers.0.self_attn.o_proj.weight"]
        assert torch.allclose(ratio[:, :16], ratio[:, 16:32]) and not torch.allclose(ratio[:, :16], ratio[:, 32:48])


@pytest.mark.parametrize("scheme", [{"bits": 3, "group_size": -1}, {"bits": 4, "group_size": 32}])
def test_awq_lowers_the_output_error_of_rtn_and_gptq(scheme):
    """Measured on the outlier model (held-out ids, logits MSE): AWQ before RTN about halves RTN's error; before
    GPTQ it is 2-4x below GPTQ alone."""
    awq = {"awq": {"scheme": scheme}}
    assert _err([awq, {"rtn": {"scheme": scheme}}]) < 0.8 * _err([{"rtn": {"scheme": scheme}}])
    assert _err([awq, {"gptq": {"scheme": scheme}}]) < 0.8 * _err([{"gptq": {"scheme": scheme}}])


def test_awq_then_gptq_exports_and_reloads(tmp_path):
    scheme = {"bits": 4, "group_size": 32, "symmetric": True}
    recipe = Recipe.from_dict({"passes": [{"awq": {"scheme": scheme, "duo_scaling": True}},
                                          {"gptq": {"scheme": scheme}}]})
    model = compress(_outlier_llama(), recipe, calibration=IDS, quiet=True)
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    assert torch.equal(_logits(loaded), _logits(model))


def test_bad_settings_and_families_are_refused():
    with pytest.raises(ValueError, match="awq.grid"):
        Recipe.from_dict({"passes": [{"awq": {"grid": 0}}]})
    with pytest.raises(ValueError, match=r"awq.inputs='int4': use one of"):
        Recipe.from_dict({"passes": [{"awq": {"inputs": "int4"}}]})
    with pytest.raises(ValueError, match="awq.statistic='min': use one of mean, max"):
        Recipe.from_dict({"passes": [{"awq": {"statistic": "min"}}]})
    with pytest.raises(ValueError, match="awq.grouped_v: expected true/false"):
        Recipe.from_dict({"passes": [{"awq": {"grouped_v": "yes"}}]})
    with pytest.raises(ValueError, match="awq.samples"):
        Recipe.from_dict({"passes": [{"awq": {"inputs": "nvfp4", "samples": 0}}]})
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    with pytest.raises(ValueError, match="awq: model_type='gemma2' has"):
        compress(gemma, Recipe.from_dict({"passes": [{"awq": {}}, {"rtn": {}}]}), calibration=IDS, quiet=True)
