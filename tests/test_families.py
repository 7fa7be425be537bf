"""The family matrix: tiny random configs of the decoders people compress, through RTN, GPTQ and Wanda 2:4,
exported and reloaded (docs/models.md is this file's table in words).

Dense families must compress every targeted weight (coverage 100%) and reload
with the in-memory model's logits (RTN, GPTQ: bit-exact in float32). MoE
families keep their experts as fused 3-D parameters in transformers 5: RTN and
GPTQ quantize each expert's gate / up / down (the gate_up_proj / down_proj
layout; GPTQ from the tokens the router sends each expert), export them one
linear per expert under the family's checkpoint names and reload them; the
passes that do not compress experts yet (Wanda and the other pruners), and
layouts RTN does not know (gpt-oss), are pinned to the refusal (a skip is an
error), so the day they are supported this file says so by failing.
"""

from __future__ import annotations

import json

import pytest
import torch

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.core.coverage import coverage

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1)
# family -> config overrides beyond SIZES
DENSE = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3_text": {"query_pre_attn_scalar": 16, "sliding_window": 16},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {},
}
# family -> config overrides beyond SIZES and MOE (DeepSeek's MLA ranks default to real sizes)
MOE_FAMILIES = {"qwen3_moe": {}, "mixtral": {}, "olmoe": {}, "granitemoe": {}, "glm4_moe": {}, "gpt_oss": {},
                "deepseek_v3": {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                                "v_head_dim": 16, "head_dim": 8}}
IDS = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
RECIPES = {
    "rtn": {"rtn": {"scheme": {"bits": 4, "group_size": 32}}},
    "gptq": {"gptq": {"scheme": {"bits": 4, "group_size": 32}}},
    "wanda-2:4": {"prune": {"method": "wanda", "structure": "2:4"}},
}


def tiny(family: str, **extra) -> torch.nn.Module:
    """A random tiny model of ``family`` (float32, eval mode)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {family}")
    cfg = CONFIG_MAPPING[family](**{**SIZES, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS[:2]).logits


@pytest.mark.parametrize("method", list(RECIPES))
@pytest.mark.parametrize("family", list(DENSE))
def test_dense_family(family, method, tmp_path):
    model = tiny(family, **DENSE[family])
    recipe = Recipe.from_dict({"passes": [RECIPES[method]]})
    compress(model, recipe, calibration=IDS, quiet=True)
    cov = coverage(model, recipe.build())
    assert cov["compressed"] == cov["targeted"] > 0.5 * cov["total"], cov
    ref = _logits(model)
    assert torch.isfinite(ref).all()
    if method == "wanda-2:4":
        return  # pruned-only models export as plain checkpoints: tests/prune covers that path
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    assert torch.equal(_logits(loaded), ref)


# families whose fused experts RTN quantizes and the export writes per expert (gate_up_proj / down_proj layout)
MOE_RTN = ["qwen3_moe", "mixtral", "olmoe", "glm4_moe", "deepseek_v3"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("family", MOE_RTN)
def test_moe_family_quantizes_experts_and_reloads(family, method, tmp_path):
    model = tiny(family, **MOE, **MOE_FAMILIES[family])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 3}
    recipe = Recipe.from_dict({"passes": [RECIPES[method]]})
    compress(model, recipe, calibration=IDS, quiet=True)
    cov = coverage(model, recipe.build())
    assert cov["compressed"] == cov["targeted"] and cov["kinds"]["experts"]["compressed"] == cov["kinds"]["experts"]["total"] > 0
    for name, old in before.items():  # every expert moved onto its own grid: at most 2^4 levels per group row
        new = dict(model.named_parameters())[name]
        assert not torch.equal(new, old)
        assert new.reshape(-1, 32).unique(dim=1).shape[1] <= 32  # cheap sanity; exactness is the reload below
    ref = _logits(model)
    out = tmp_path / "e"
    save_compressed(model, out, recipe=recipe)
    loaded = load_compressed(out)
    assert type(loaded.get_submodule(next(iter(before)).rpartition(".")[0])).__name__ == "QuantExperts"
    # gate and up run as two matmuls here and as one fused one in transformers: equal up to float32 rounding
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_RTN)
def test_moe_family_prunes_experts_and_reloads(family, tmp_path):
    """Wanda 2:4 prunes every expert (each projection its own matrix, from its routed tokens); a pruned-only model
    exports as a plain checkpoint, which transformers reloads into its fused experts with the same logits."""
    from transformers import AutoModelForCausalLM

    model = tiny(family, **MOE, **MOE_FAMILIES[family])
    recipe = Recipe.from_dict({"passes": [RECIPES["wanda-2:4"]]})
    compress(model, recipe, calibration=IDS, quiet=True, output=tmp_path / "e")
    cov = coverage(model, recipe.build())
    assert cov["compressed"] == cov["targeted"] and cov["kinds"]["experts"]["compressed"] == cov["kinds"]["experts"]["total"] > 0
    for name, p in model.named_parameters():
        if p.ndim == 3:  # (E, N, K): at least 2 zeros in every 4 consecutive inputs
            assert ((p.reshape(*p.shape[:2], -1, 4) == 0).sum(-1) >= 2).all(), name
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "e", dtype=torch.float32).eval()
    assert torch.equal(_logits(theirs), _logits(model))


def test_moe_export_uses_the_checkpoint_names_vllm_reads(tmp_path):
    """Mixtral's checkpoints (and vLLM) name experts block_sparse_moe.experts.{e}.w1/w3/w2; Qwen3-MoE's
    mlp.experts.{e}.gate_proj/up_proj/down_proj. Routers stay in full precision, listed in ignore."""
    from safetensors import safe_open

    for family, expert, router in (("mixtral", "model.layers.0.block_sparse_moe.experts.3.w3",
                                    "model.layers.0.block_sparse_moe.gate"),
                                   ("qwen3_moe", "model.layers.0.mlp.experts.3.up_proj", "model.layers.0.mlp.gate")):
        model = tiny(family, **MOE)
        compress(model, Recipe.from_dict({"passes": [RECIPES["rtn"]]}), quiet=True)
        out = save_compressed(model, tmp_path / family)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            up = f.get_tensor(f"{expert}.weight_packed")
        inter = MOE["moe_intermediate_size"] if family == "qwen3_moe" else SIZES["intermediate_size"]
        assert up.shape == (inter, SIZES["hidden_size"] // 8) and up.dtype == torch.int32
        assert {f"{expert}.weight_scale", f"{expert}.weight_zero_point", f"{expert}.weight_shape",
                f"{router}.weight"} <= keys
        assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in keys)
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert router in qcfg["ignore"]


def test_transformers_loads_our_moe_export(tmp_path):
    """transformers (with compressed-tensors) reads the per-expert packed tensors back into its fused experts."""
    from transformers import AutoModelForCausalLM

    model = tiny("qwen3_moe", **MOE)
    sym = {"rtn": {"scheme": {"bits": 4, "group_size": 32, "symmetric": True}}}
    compress(model, Recipe.from_dict({"passes": [sym]}), quiet=True)
    out = save_compressed(model, tmp_path / "e")
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(theirs.model.layers[1].mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)
    assert torch.equal(_logits(theirs), _logits(model))


def test_moe_expert_state_survives_a_block_checkpoint(tmp_path):
    from compressor.pipeline.checkpoint import BlockCheckpoint

    model = tiny("qwen3_moe", **MOE)
    compress(model, Recipe.from_dict({"passes": [RECIPES["rtn"]]}), quiet=True)
    block = model.model.layers[0]
    ckpt = BlockCheckpoint(tmp_path, {"run": 1})
    ckpt.save(0, block)
    fresh = tiny("qwen3_moe", **MOE).model.layers[0]
    ckpt.load(0, fresh)
    experts, saved = fresh.mlp.experts, block.mlp.experts
    assert experts.experts_scheme == saved.experts_scheme
    assert torch.equal(experts.gate_up_proj_scale, saved.gate_up_proj_scale)
    assert torch.equal(experts.down_proj, saved.down_proj)


def test_moe_passes_without_expert_support_refuse():
    model = tiny("qwen3_moe", **MOE)
    with pytest.raises(ValueError, match=r"would leave .*experts.* untouched .*Qwen3MoeExperts parameters, which "
                                         r"gguf cannot compress yet.*add 're:model\\\.layers"):
        compress(model, Recipe.from_dict({"passes": [{"gguf": {}}]}), calibration=IDS, quiet=True)


W3 = {"bits": 3, "group_size": 32}
CALIB = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))


def test_gptq_on_experts_beats_rounding_them():
    """Each expert's Hessian from the tokens routed to it: GPTQ on the experts (attention kept in full precision,
    so the experts' error is all there is) lowers the output error on held-out tokens against rounding them to
    nearest (measured: 2.11e-6 against 2.54e-6; on the calibration tokens 1.69e-6 against 2.65e-6)."""
    base = tiny("qwen3_moe", **MOE)
    with torch.no_grad():
        ref = base(HELD_OUT).logits

    def error(passes):
        model = tiny("qwen3_moe", **MOE)
        compress(model, Recipe.from_dict({"passes": passes}), calibration=CALIB, quiet=True)
        with torch.no_grad():
            return (model(HELD_OUT).logits - ref).pow(2).mean().item()

    experts_only = {"scheme": W3, "targets": ["Experts"], "ignore": ["lm_head", "re:.*self_attn"]}
    gptq, rtn = error([{"gptq": experts_only}]), error([{"rtn": experts_only}])
    assert gptq < 0.9 * rtn, (gptq, rtn)


def test_expert_with_too_few_tokens_is_rounded_with_a_count(caplog):
    """min_expert_tokens: routed experts below it fall back to RTN, counted in a warning; all_experts calibration
    gives every expert every token, so none falls back."""
    few = {"gptq": {"scheme": W3, "min_expert_tokens": 10_000}}
    with caplog.at_level("WARNING", logger="compressor.passes.gptq"):
        compress(tiny("qwen3_moe", **MOE), Recipe.from_dict({"passes": [few]}), calibration=CALIB, quiet=True)
    counts = [r.getMessage() for r in caplog.records if "min_expert_tokens" in r.getMessage()]
    assert len(counts) == 2 and all("4 of 4 experts" in m for m in counts), counts
    caplog.clear()
    every = {"gptq": {"scheme": W3, "min_expert_tokens": 10_000, "moe_calibration": "all_experts"}}
    with caplog.at_level("WARNING", logger="compressor.passes.gptq"):
        compress(tiny("qwen3_moe", **MOE), Recipe.from_dict({"passes": [every]}), calibration=CALIB, quiet=True)
    assert not [r for r in caplog.records if "min_expert_tokens" in r.getMessage()]


def test_moe_unknown_layout_and_fused_checkpoints_refuse(tmp_path):
    # gpt-oss stores its experts transposed with biases: RTN does not know the layout
    with pytest.raises(ValueError, match=r"rtn would leave .*experts.* GptOssExperts parameters, which rtn cannot"):
        compress(tiny("gpt_oss", **MOE), Recipe.from_dict({"passes": [RECIPES["rtn"]]}), quiet=True)
    # Granite-MoE's checkpoints keep experts fused: quantized in memory, but the export says what to do
    model = tiny("granitemoe", **MOE)
    compress(model, Recipe.from_dict({"passes": [RECIPES["rtn"]]}), quiet=True)
    with pytest.raises(ValueError, match="keep the experts fused.*add the experts to ignore"):
        save_compressed(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_gemma4_per_layer_inputs(tmp_path):
    """Gemma 4: its per-layer embeddings are lookup tables (exempt, like the input embedding); RTN covers every
    linear; GPTQ refuses the projection that sits outside the decoder blocks and names the fix."""
    extra = {"vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 32}
    model = tiny("gemma4_text", **extra)
    recipe = Recipe.from_dict({"passes": [RECIPES["rtn"]]})
    compress(model, recipe, quiet=True)
    cov = coverage(model, recipe.build())
    assert cov["compressed"] == cov["targeted"] and cov["kinds"]["embeddings"]["targeted"] == 0
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    assert torch.equal(_logits(loaded), _logits(model))
    with pytest.raises(ValueError, match="per_layer_model_projection.*outside the decoder blocks.*add them to ignore"):
        compress(tiny("gemma4_text", **extra), Recipe.from_dict({"passes": [RECIPES["gptq"]]}), calibration=IDS,
                 quiet=True)


def test_moe_gptq_on_dense_layers_rtn_on_experts(tmp_path):
    """The recipe docs/recipes.md gives for MoE today: each quantize pass takes its part, coverage is complete."""
    model = tiny("qwen3_moe", **MOE)
    recipe = Recipe.from_dict({"passes": [
        {"gptq": {"scheme": {"bits": 4, "group_size": 32}, "ignore": ["lm_head", "Experts"]}},
        {"rtn": {"scheme": {"bits": 4, "group_size": 32}, "targets": ["Experts"]}},
    ]})
    compress(model, recipe, calibration=IDS, quiet=True)
    cov = coverage(model, recipe.build())
    assert cov["compressed"] == cov["targeted"] and cov["kinds"]["experts"]["compressed"] > 0
    assert cov["kinds"]["attention"]["compressed"] == cov["kinds"]["attention"]["targeted"] > 0
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)


def test_activation_quantization_refuses_expert_inputs_and_names_the_fix(tmp_path):
    """W4A8 on an MoE: expert inputs are not quantized yet, so the run stops (never a silent weight-only expert);
    with Experts ignored by the activation pass, the experts run weight-only and the export reloads."""
    w4a8 = [RECIPES["rtn"], {"quantize_activations": {"bits": 8, "kv_bits": None}}]
    with pytest.raises(ValueError, match=r"inputs of the fused MoE experts \['model\.layers\.0\.mlp\.experts', "
                                         r"'model\.layers\.1\.mlp\.experts'\].*add 'Experts' to this pass's ignore"):
        compress(tiny("qwen3_moe", **MOE), Recipe.from_dict({"passes": w4a8}), quiet=True)
    w4a8[1] = {"quantize_activations": {"bits": 8, "kv_bits": None, "ignore": ["lm_head", "Experts"]}}
    model = tiny("qwen3_moe", **MOE)
    recipe = Recipe.from_dict({"passes": w4a8})
    compress(model, recipe, quiet=True)
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)
