"""Coverage is a number, and a skip is an error: large weights no target reaches stop compress before any work."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressor import Recipe, compress
from compressor.core.arch import parameter_kinds
from compressor.core.coverage import check_untouched, coverage, format_coverage
from compressor.inspect import format_summary, summarize
from tests.helpers import tiny_llama

RTN = {"rtn": {"scheme": {"bits": 4, "group_size": 32}}}
EXPERTS_IGNORE = r"re:model\.layers\.\d+\.mlp\.experts$"


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                         num_experts_per_tok=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


class FusedProjection(nn.Module):
    """An unknown module with a fused 2-D weight (not an nn.Linear), as a new architecture might bring."""

    def __init__(self, width: int):
        super().__init__()
        self.fused_weight = nn.Parameter(torch.randn(2 * width, width) * 0.02)

    def forward(self, x):
        return x


def test_moe_experts_untargeted_is_an_error_that_names_them_and_the_fix():
    """``targets: [Linear]`` (the default before fused experts were supported) leaves the experts out: an error."""
    linear_only = {"rtn": {**RTN["rtn"], "targets": ["Linear"]}}
    with pytest.raises(ValueError) as err:
        compress(tiny_qwen3_moe(), Recipe.from_dict({"passes": [linear_only]}), quiet=True)
    text = str(err.value)
    assert "rtn would leave model.layers.0.mlp.experts.gate_up_proj (8, 64, 64)" in text
    assert "72.0% of the parameters, experts" in text and "Qwen3MoeExperts parameters, which no target" in text
    assert f"add '{EXPERTS_IGNORE}' to the ignore list" in text


def test_default_targets_quantize_the_experts():
    model = tiny_qwen3_moe()
    recipe = Recipe.from_dict({"passes": [RTN]})
    compress(model, recipe, quiet=True)
    cov = coverage(model, recipe.build())
    assert cov["kinds"]["experts"] == {"total": 8 * (64 * 64 + 64 * 32) * 2, "targeted": 8 * (64 * 64 + 64 * 32) * 2,
                                       "compressed": 8 * (64 * 64 + 64 * 32) * 2}


def test_ignored_experts_run_and_coverage_says_what_was_left():
    model = tiny_qwen3_moe()
    recipe = Recipe.from_dict({"passes": [{"rtn": {**RTN["rtn"], "ignore": ["lm_head", EXPERTS_IGNORE]}}]})
    compress(model, recipe, quiet=True)
    (p,) = recipe.build()
    cov = coverage(model, [p])
    assert cov["kinds"]["attention"]["compressed"] == cov["kinds"]["attention"]["targeted"] == 4 * 2 * 64 * 48  # q k v o
    assert cov["kinds"]["experts"] == {"total": 8 * (64 * 64 + 64 * 32) * 2, "targeted": 0, "compressed": 0}
    assert cov["kinds"]["router"]["compressed"] == 0 and cov["compressed"] == cov["targeted"]
    assert "experts 0/0/98.3k" in format_coverage(cov)


def test_planted_fused_weight_module_fails_before_any_work():
    model = tiny_llama()
    for block in model.model.layers:
        block.fused = FusedProjection(64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"rtn would leave model\.layers\.0\.fused\.fused_weight \(128, 64\).*"
                                         r"FusedProjection parameters.*'re:model\\\.layers\\\.\\d\+\\\.fused\$'"):
        compress(model, Recipe.from_dict({"passes": [RTN]}), quiet=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was touched


def test_narrow_targets_need_their_ignore_and_small_weights_are_free():
    model = tiny_llama()
    narrow = {"rtn": {**RTN["rtn"], "targets": ["re:.*mlp.*"]}}
    with pytest.raises(ValueError, match=r"self_attn\.q_proj.*no target matches them.*self_attn\\\.q_proj"):
        compress(model, Recipe.from_dict({"passes": [narrow]}), quiet=True)
    narrow["rtn"]["ignore"] = ["lm_head", "re:.*self_attn.*"]
    compress(model, Recipe.from_dict({"passes": [narrow]}), quiet=True)
    tiny = tiny_llama()
    passes = Recipe.from_dict({"passes": [narrow]}).build()
    check_untouched(tiny, passes, limit=0.5)  # below the limit nothing is required


def test_quantize_and_prune_are_checked_apart():
    """A prune pass over the MLPs does not excuse the attention from the quantization pass, nor the reverse."""
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "magnitude", "sparsity": 0.5, "targets": ["re:.*mlp.*"],
                                                      "ignore": ["lm_head", "re:.*self_attn.*"]}}, RTN]})
    compress(tiny_llama(), recipe, quiet=True)
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "magnitude", "sparsity": 0.5, "targets": ["re:.*mlp.*"]}},
                                          RTN]})
    with pytest.raises(ValueError, match="prune would leave"):
        compress(tiny_llama(), recipe, quiet=True)


def test_manifest_and_inspect_carry_the_coverage(tmp_path):
    compress(tiny_llama(), Recipe.from_dict({"passes": [RTN]}), output=tmp_path / "e", quiet=True)
    manifest = json.loads((tmp_path / "e" / "compressor_manifest.json").read_text())
    assert manifest["coverage"]["compressed"] == manifest["coverage"]["targeted"] == 55296
    assert "coverage (compressed/targeted/total parameters): 55.3k/55.3k/61.8k, 100.0% of targeted" in \
        format_summary(summarize(tmp_path / "e"))


def test_parameter_kinds_of_a_moe_block():
    kinds = parameter_kinds(tiny_qwen3_moe())
    assert kinds["model.layers.0.mlp.experts.down_proj"] == "experts"
    assert kinds["model.layers.0.mlp.gate.weight"] == "router"
    assert kinds["model.layers.0.self_attn.q_norm.weight"] == "attention"
    assert kinds["model.layers.0.post_attention_layernorm.weight"] == "other"
    assert kinds["model.embed_tokens.weight"] == "embeddings" and kinds["lm_head.weight"] == "lm_head"
