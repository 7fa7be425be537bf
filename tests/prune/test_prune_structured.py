"""Structured pruning on tiny Llamas: exact slicing, updated config, plain reload, smaller files, scores, errors."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor import Recipe, compress
from compressor.core.arch import LAYOUTS, find_blocks
from compressor.pipeline.sequential import PipelineConfig
from compressor.algorithms.prune.structured import (
    UnitCovarianceAccumulator, head_scores, keep_indices, mlp_channel_scores, remove_heads, remove_mlp_channels,
)
from compressor.export.pruned import save_pruned
from compressor.passes.structured import StructuredPruneConfig, StructuredPrunePass

IDS = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
QUIET = PipelineConfig(batch_size=4, quiet=True)
LAYOUT = LAYOUTS["llama"]


def gqa_llama(seed: int = 0, heads: int = 8, kv: int = 2):
    """A random Llama with 8 query / 2 KV heads (n_rep 4) and an explicit head_dim 16 != hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _run(model, **cfg):
    compress(model, Recipe.from_dict({"passes": [{"prune_structured": cfg}]}), calibration=IDS, pipeline=QUIET, quiet=True)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _blocks(model):
    return find_blocks(model)[1]


def _zero_channels(block, keep):
    drop = torch.ones(block.mlp.down_proj.in_features, dtype=torch.bool)
    drop[keep] = False
    block.mlp.gate_proj.weight.data[drop] = 0
    block.mlp.up_proj.weight.data[drop] = 0
    block.mlp.down_proj.weight.data[:, drop] = 0


def _zero_heads(block, keep_q, head_dim):
    drop = torch.ones(block.self_attn.o_proj.in_features // head_dim, dtype=torch.bool)
    drop[keep_q] = False
    block.self_attn.o_proj.weight.data.view(-1, len(drop), head_dim)[:, drop] = 0


# ---------------------------------------------------------------- slicing is exact


def test_mlp_removal_equals_zeroed_channels():
    """Sliced model == the original with those channels zeroed (float64, so only summation order differs)."""
    model, ref = tiny_llama().double(), tiny_llama().double()
    g = torch.Generator().manual_seed(1)
    for block, ref_block in zip(_blocks(model), _blocks(ref)):
        keep = torch.randperm(80, generator=g)[:53].sort().values
        remove_mlp_channels(block, LAYOUT, keep)
        _zero_channels(ref_block, keep)
        assert block.mlp.gate_proj.weight.shape == (53, 64) and block.mlp.down_proj.weight.shape == (64, 53)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("unit", ["query", "group"])
def test_head_removal_equals_zeroed_heads(unit):
    """GQA 8/2 heads: removing query heads (per KV group) or whole groups == zeroing their o_proj columns."""
    model, ref = gqa_llama().double(), gqa_llama().double()
    for block, ref_block in zip(_blocks(model), _blocks(ref)):
        if unit == "query":  # one head from each group of 4 (heads 0-3 -> KV 0, heads 4-7 -> KV 1)
            keep_q, keep_kv = torch.tensor([0, 2, 3, 4, 5, 7]), torch.arange(2)
        else:
            keep_q, keep_kv = torch.tensor([4, 5, 6, 7]), torch.tensor([1])
        remove_heads(block, LAYOUT, keep_q, keep_kv, head_dim=16)
        _zero_heads(ref_block, keep_q, 16)
        attn = block.self_attn
        assert attn.q_proj.out_features == len(keep_q) * 16 and attn.o_proj.in_features == len(keep_q) * 16
        assert attn.k_proj.out_features == attn.v_proj.out_features == len(keep_kv) * 16
        assert attn.num_key_value_groups == len(keep_q) // len(keep_kv)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=1e-12)


def test_remove_heads_refuses_uneven_groups():
    block = _blocks(gqa_llama())[0]
    with pytest.raises(ValueError, match="same number per KV head"):
        remove_heads(block, LAYOUT, torch.tensor([0, 1, 4]), torch.arange(2), head_dim=16)
    with pytest.raises(ValueError, match="belong to kept KV heads"):
        remove_heads(block, LAYOUT, torch.tensor([0, 1]), torch.tensor([1]), head_dim=16)


# ---------------------------------------------------------------- the pass: choice, config, export


@pytest.mark.parametrize("unit", ["query", "group"])
def test_magnitude_pass_removes_lowest_scored_and_is_exact(unit):
    """The pass removes exactly the lowest-scored channels / heads of every block; the model equals the zeroed one."""
    model, ref = gqa_llama().double(), gqa_llama().double()
    for block in _blocks(ref):
        m, a = block.mlp, block.self_attn
        keep = keep_indices(mlp_channel_scores(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight), 20)
        _zero_channels(block, keep)
        if unit == "query":
            keep_q = keep_indices(head_scores(a.o_proj.weight, 16), 2, groups=2)  # 2 of 4 in each group
        else:
            keep_q = keep_indices(head_scores(a.o_proj.weight, 64), 1) * 4 + torch.arange(4)
        _zero_heads(block, keep_q, 16)
    _run(model, mlp_fraction=0.25, head_fraction=0.5, score="magnitude", head_unit=unit)
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (60, 4, 2 if unit == "query" else 1, 16)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=1e-12)


def _inputs(model, module_name):
    """(T, K) inputs of ``module_name`` on IDS."""
    seen = []
    module = model.get_submodule(module_name)
    h = module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    _logits(model)
    h.remove()
    return torch.cat(seen)


def test_activation_pass_keeps_largest_contributions():
    """Block 0 is scored on the dense model's activations: it keeps the channels whose ||down[:, c] h_c^T|| and the
    query heads (2 of 4 per KV group) whose ||x_u W_o[:, u]^T|| is largest, brute-forced here."""
    dense, layer = gqa_llama(), "model.layers.0"
    h, w = _inputs(dense, f"{layer}.mlp.down_proj"), dense.get_submodule(f"{layer}.mlp.down_proj").weight  # (T, 80)
    channel = torch.stack([torch.outer(w[:, c], h[:, c]).norm() for c in range(80)])
    keep_c = channel.argsort(descending=True)[:60].sort().values
    x, o = _inputs(dense, f"{layer}.self_attn.o_proj"), dense.get_submodule(f"{layer}.self_attn.o_proj").weight
    head = torch.stack([(x[:, 16 * u:16 * (u + 1)] @ o[:, 16 * u:16 * (u + 1)].T).norm() for u in range(8)])
    keep_q = (head.view(2, 4).argsort(dim=1, descending=True)[:, :2] + torch.tensor([[0], [4]])).flatten().sort().values
    model = _run(gqa_llama(), mlp_fraction=0.25, head_fraction=0.5, score="activation")
    gate, q = (dense.get_submodule(f"{layer}.{n}").weight for n in ("mlp.gate_proj", "self_attn.q_proj"))
    assert torch.equal(model.get_submodule(f"{layer}.mlp.gate_proj").weight, gate[keep_c])
    assert torch.equal(model.get_submodule(f"{layer}.self_attn.q_proj").weight, q.view(8, 16, 64)[keep_q].reshape(-1, 64))


def test_save_reload_plain_transformers_smaller(tmp_path):
    """save_pruned -> AutoModelForCausalLM.from_pretrained: same logits, safetensors smaller by the removed parameters."""
    from transformers import AutoModelForCausalLM

    dense = gqa_llama()
    dense.save_pretrained(tmp_path / "dense")
    n_dense = sum(p.numel() for p in dense.parameters())
    cfg = {"mlp_fraction": 0.25, "head_fraction": 0.5, "head_unit": "group"}
    model = _run(gqa_llama(), **cfg)
    n_pruned = sum(p.numel() for p in model.parameters())
    recipe = Recipe.from_dict({"passes": [{"prune_structured": cfg}]})
    out = save_pruned(model, tmp_path / "pruned", recipe=recipe, info={"seed": 0})
    assert (out / "recipe.yaml").is_file() and (out / "compressor_manifest.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (loaded.config.intermediate_size, loaded.config.num_attention_heads, loaded.config.num_key_value_heads,
            loaded.config.head_dim) == (60, 4, 1, 16)
    assert torch.equal(_logits(loaded), _logits(model))
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("dense", "pruned")}
    # 4 bytes a parameter plus a header of a few kB
    assert size["pruned"] / size["dense"] == pytest.approx(n_pruned / n_dense, abs=0.02)
    assert n_pruned / n_dense < 0.8


def test_qwen2_biases_follow_their_rows(tmp_path):
    """Qwen2 has q/k/v biases: group removal slices them with the rows and the result reloads with plain transformers."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval().double()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias)
    ref = Qwen2ForCausalLM(cfg).eval().double()
    ref.load_state_dict(model.state_dict())
    for block in _blocks(ref):
        keep_q = keep_indices(head_scores(block.self_attn.o_proj.weight, 32), 1) * 4 + torch.arange(4)
        _zero_heads(block, keep_q, 8)
    _run(model, head_fraction=0.5, head_unit="group", score="magnitude")
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == attn.v_proj.bias.shape == (8,)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=1e-12)
    loaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "q"), dtype=torch.float64).eval()
    assert torch.equal(_logits(loaded), _logits(model))


def test_save_pruned_refuses_existing_quantized_and_uneven(tmp_path):
    model = _run(tiny_llama(), mlp_fraction=0.25, score="magnitude")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_pruned(model, tmp_path / "x")
    remove_mlp_channels(model.model.layers[1], LAYOUT, torch.arange(10))
    with pytest.raises(ValueError, match="pruned unevenly"):
        save_pruned(model, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    quantized = tiny_llama()
    compress(quantized, Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 16}}}]}), quiet=True)
    with pytest.raises(ValueError, match="save_compressed"):
        save_pruned(quantized, tmp_path / "z")


# ---------------------------------------------------------------- scores and selection


def test_activation_head_score_is_contribution_norm():
    """sqrt(tr(W_u cov_u W_u^T)) == RMS norm over tokens of the unit's output x_u W_u^T, per head and per group."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(12, 48, generator=g), torch.randn(5, 7, 48, generator=g)  # 6 heads of 8, (B, T, C)
    for width in (8, 24):
        acc = UnitCovarianceAccumulator(48 // width, width)
        acc.add(x[:2])
        acc.add(x[2:])
        tokens = x.reshape(-1, 48)
        brute = torch.stack([(tokens[:, u * width:(u + 1) * width] @ w[:, u * width:(u + 1) * width].T).pow(2).sum(1)
                             .mean().sqrt() for u in range(48 // width)])
        torch.testing.assert_close(head_scores(w, width, acc.cov), brute, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head_scores(w, 8), w.reshape(12, 6, 8).pow(2).sum((0, 2)).sqrt())


def test_mlp_scores_and_keep_indices():
    gate, up, down = torch.ones(4, 3), torch.ones(4, 3), torch.ones(3, 4)
    gate[1] *= 0.1
    down[:, 3] *= 0.5
    assert torch.equal(keep_indices(mlp_channel_scores(gate, up, down), 2), torch.tensor([0, 2]))
    norms = torch.tensor([0.1, 10.0, 1.0, 1.0])  # activation: channel 1's large input outweighs its small gate
    assert torch.equal(keep_indices(mlp_channel_scores(gate, up, down, norms), 2), torch.tensor([1, 2]))
    # per group, ties go to the lower index first
    assert torch.equal(keep_indices(torch.tensor([3.0, 1.0, 2.0, 5.0, 0.0, 0.0]), 1, groups=2), torch.tensor([0, 2, 3, 5]))
    with pytest.raises(ValueError, match="at least one must stay"):
        keep_indices(torch.ones(4), 2, groups=2)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cfg,match", [
    ({"mlp_fraction": 1.0}, r"in \[0, 1\)"),
    ({"head_fraction": -0.1}, r"in \[0, 1\)"),
    ({}, "removes nothing"),
    ({"mlp_fraction": 0.25, "score": "wanda"}, "score='wanda'"),
    ({"mlp_fraction": 0.25, "head_unit": "kv"}, "head_unit='kv'"),
    ({"mlp_fraction": 0.25, "targets": ["re:.*mlp.*"]}, "every decoder block alike"),
    ({"mlp_fraction": 0.25, "mlp_fracton": 0.1}, "did you mean 'mlp_fraction'"),
])
def test_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"passes": [{"prune_structured": cfg}]})


def test_recipe_round_trip():
    recipe = Recipe.from_dict({"passes": [{"prune_structured": {"mlp_fraction": 0.25, "score": "magnitude"}}]})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.passes[0][1] == StructuredPruneConfig(mlp_fraction=0.25, score="magnitude")


def test_fraction_that_removes_nothing_or_needs_groups():
    with pytest.raises(ValueError, match=r"removes floor\(0.2 \* 4\) = 0 .* use at least 0.25"):
        _run(gqa_llama(), head_fraction=0.2, score="magnitude")
    with pytest.raises(ValueError, match=r"floor\(0.01 \* 80\) = 0 of the 80 MLP channels; use at least 0.013"):
        _run(gqa_llama(), mlp_fraction=0.01, score="magnitude")
    mha = gqa_llama(heads=4, kv=4)  # one query head per KV head: only whole groups can go
    with pytest.raises(ValueError, match="only 1 of the query heads .* use head_unit: group"):
        _run(mha, head_fraction=0.5, score="magnitude")
    assert _run(mha, head_fraction=0.5, score="magnitude", head_unit="group").config.num_key_value_heads == 2


def test_refuses_unsupported_quantized_and_uncalibrated():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="no gated-MLP layout"):
        _run(gpt2, mlp_fraction=0.25, score="magnitude")
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 16}}},
                                          {"prune_structured": {"mlp_fraction": 0.25, "score": "magnitude"}}]})
    with pytest.raises(ValueError, match="already quantized"):
        compress(tiny_llama(), recipe, quiet=True)
    with pytest.raises(ValueError, match="need calibration data"):
        compress(tiny_llama(), Recipe.from_dict({"passes": [{"prune_structured": {"mlp_fraction": 0.25}}]}), quiet=True)
    with pytest.raises(ValueError, match="score='activation' needs calibration data"):
        StructuredPrunePass(StructuredPruneConfig(mlp_fraction=0.25)).apply(tiny_llama())


def test_after_rotation():
    """Fused rotations (r1, r2) keep channels and heads prunable; an online Hadamard on down_proj's input does not."""
    rotated = {"rotate": {"r4": False}}
    prune = {"prune_structured": {"mlp_fraction": 0.25, "head_fraction": 0.5, "score": "magnitude"}}
    model = tiny_llama()
    compress(model, Recipe.from_dict({"passes": [rotated, prune]}), quiet=True)
    assert model.config.intermediate_size == 60 and torch.isfinite(_logits(model)).all()
    with pytest.raises(ValueError, match="rotates its input online"):
        compress(tiny_llama(), Recipe.from_dict({"passes": [{"rotate": {}}, prune]}), quiet=True)


def test_then_quantize_composes():
    """prune_structured before gptq: the quantizer sees the sliced linears."""
    recipe = Recipe.from_dict({"passes": [{"prune_structured": {"mlp_fraction": 0.25, "head_fraction": 0.5}},
                                          {"gptq": {"scheme": {"bits": 4, "group_size": 16}}}]})
    model = tiny_llama()
    compress(model, recipe, calibration=IDS, pipeline=QUIET, quiet=True)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, nn.Linear) and down.in_features == 60 and hasattr(down, "quant_scheme")
    assert torch.isfinite(_logits(model)).all()


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_quarter_mlp_channels(smollm2_path, tmp_path):
    """SmolLM2-135M, 25% MLP channels by activation (16 x 512 calibration tokens): a plain checkpoint 14.8%
    smaller (the tied 49152 x 576 embedding stays) whose perplexity (DESIGN.md protocol) is 39.30 (fp32: 23.07)."""
    from transformers import AutoModelForCausalLM

    from compressor import evaluate
    from compressor.api import load_model, load_tokenizer
    from compressor.calibration import calibration_set

    tok = load_tokenizer(smollm2_path)
    model = load_model(smollm2_path)
    recipe = Recipe.from_dict({"passes": [{"prune_structured": {"mlp_fraction": 0.25, "score": "activation"}}]})
    calib = calibration_set("sotu:1790-1999", tok, n=16, seq_len=512, seed=0)
    compress(model, recipe, calibration=calib, pipeline=PipelineConfig(device="cpu", quiet=True), quiet=True)
    out = save_pruned(model, tmp_path / "pruned", tokenizer=tok, recipe=recipe)
    del model
    ratio = (out / "model.safetensors").stat().st_size / (smollm2_path / "model.safetensors").stat().st_size
    assert ratio == pytest.approx(0.852, abs=0.001)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.intermediate_size == 1152
    assert evaluate(reloaded, tokenizer=tok, quiet=True).ppl == pytest.approx(39.30, rel=0.01)
