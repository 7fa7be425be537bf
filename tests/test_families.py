"""The family matrix: tiny random configs of the decoders people compress, through RTN, GPTQ and Wanda 2:4,
exported and reloaded (docs/models.md is this file's table in words).

Dense families must compress every targeted weight (coverage 100%) and reload
with the in-memory model's logits (RTN, GPTQ: bit-exact in float32). MoE
families keep their experts as fused 3-D parameters in transformers 5, which no
weight pass compresses yet: for them the test pins the refusal (a skip is an
error), so the day experts are supported this file says so by failing.
"""

from __future__ import annotations

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
                                "v_head_dim": 16}}
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


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_family_experts_are_refused_not_skipped(family):
    model = tiny(family, **MOE, **MOE_FAMILIES[family])
    with pytest.raises(ValueError, match=r"rtn would leave .*experts.* untouched .*experts\): \w+ parameters"):
        compress(model, Recipe.from_dict({"passes": [RECIPES["rtn"]]}), quiet=True)


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
