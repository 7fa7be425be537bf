"""Rotations beyond Llama: Gemma's 1 + w and sandwich norms, Phi-3's fused projections, MoE blocks.

Each family's rotated model keeps its fp32 logits (the issue's 1e-3, fp32 round-off in fact), every
rotation actually moved the weights, and a rotated + RTN-quantized model exports and reloads with the
in-memory logits.
"""

from __future__ import annotations

import pytest
import torch
from tests.test_families import DENSE, MOE, MOE_FAMILIES, tiny

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.transforms.ostquant import OSTQuantConfig, ostquant_model
from compressor.algorithms.transforms.rotate import rotate_model
from compressor.core.arch import LAYOUTS, find_blocks
from compressor.runtime.online import online_transforms

IDS = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))
FAMILIES = ["gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral", "olmoe"]


def _model(family: str) -> torch.nn.Module:
    extra = {**MOE, **MOE_FAMILIES[family]} if family in MOE_FAMILIES else DENSE[family]
    model = tiny(family, **extra)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # norms away from their identity, biases away from 0
        if "norm" in name:
            p.data = torch.rand(p.shape, generator=g) + 0.5
        elif name.endswith("bias"):
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("options", [{}, {"r3": True, "online_o": True}, {"r1": "random", "r4": False}],
                         ids=["default", "r3+online_o", "random-r1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_family_keeps_logits(family, options):
    model = _model(family)
    layout = LAYOUTS[model.config.model_type]
    if options.get("r1") == "random" and layout.post_norms:
        options = {**options, "r1": "hadamard"}  # Gemma's R1 runs online, as a Hadamard (refusal tested below)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = _logits(model)
    info = rotate_model(model, seed=3, **options)
    out = _logits(model)
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-3 and diff <= 1e-5 * ref.abs().max().item(), diff

    after = dict(model.named_parameters())
    block = "model.layers.0."
    moved = [block + layout.q + ".weight", block + layout.o + ".weight"]
    if layout.experts:
        moved += [f"{block}{layout.experts}.gate_up_proj", f"{block}{layout.experts}.down_proj",
                  f"{block}{layout.router}.weight"]
    for name in moved:
        assert not torch.equal(after[name], before[name]), name
    offset = layout.norm_offset
    for name, p in after.items():  # every folded norm now scales by exactly 1 (Gemma: its weight is 0)
        if any(name == f"model.layers.{i}.{n}.weight" for i in range(2) for n in (layout.attn_norm, layout.mlp_norm)):
            assert torch.equal(p, torch.full_like(p, 1.0 - offset)), name
    if layout.post_norms:  # sandwich norms stay as they were; R1 went to the readers' inputs
        assert info["r1_at"] == "inputs" and not info["untied_embeddings"]
        assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
        for n in layout.post_norms:
            assert torch.equal(after[f"{block}{n}.weight"], before[f"{block}{n}.weight"])
        rotated = {name.rsplit(".", 1)[-1] for name in online_transforms(model)}
        assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= rotated
    else:
        assert info["r1_at"] == "residual"
        assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert info["r4_skipped_experts"] == (2 if layout.experts and options.get("r4", True) else 0)


def test_gemma_refuses_a_residual_r1_and_a_random_online_one_intact():
    model = _model("gemma3_text")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="post_attention_layernorm, post_feedforward_layernorm.*r1_at: inputs"):
        rotate_model(model, r1_at="residual")
    with pytest.raises(ValueError, match="r1='random' needs r1_at: residual"):
        rotate_model(model, r1="random")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_moe_refuses_online_r1_and_llama_takes_it():
    with pytest.raises(ValueError, match="no run-time hook inside MoE blocks"):
        rotate_model(_model("qwen3_moe"), r1_at="inputs")
    model = _model("phi3")  # a pre-norm family may still choose the online placement: exact too
    ref = _logits(model)
    info = rotate_model(model, r1_at="inputs")
    assert info["r1_at"] == "inputs"
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "qwen3_moe"])
def test_rotated_family_quantizes_exports_and_reloads(family, tmp_path):
    model = _model(family)
    recipe = Recipe.from_dict({"passes": [{"rotate": {"online_o": True}}, {"rtn": {"scheme": {"bits": 4, "group_size": 32}}}]})
    compress(model, recipe, quiet=True)
    ref = _logits(model)
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    def rotated(m):  # QuantLinear is not an nn.Linear: count the input_transform children
        return sorted(name for name, mod in m.named_modules() if "input_transform" in mod._modules)

    assert rotated(loaded) == rotated(model) and rotated(model)
    # MoE experts reload as two matmuls for gate and up (transformers fuses them): float32 rounding apart
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-5)


def test_passes_without_the_features_name_them():
    """OSTQuant and structured pruning still handle Llama-like layouts only, and say which feature stops them."""
    with pytest.raises(ValueError, match="ostquant: model_type='gemma3_text' has RMSNorms that scale by 1 \\+ w, "
                                         "norms on the attention and MLP outputs"):
        ostquant_model(_model("gemma3_text"), IDS, OSTQuantConfig(steps=1))
    model = _model("phi3")
    recipe = Recipe.from_dict({"passes": [{"prune_structured": {"mlp_fraction": 0.25}}]})
    with pytest.raises(ValueError, match="prune_structured: model_type='phi3' has a fused qkv_proj, a fused "
                                         "gate_up_proj, which prune_structured does not handle"):
        compress(model, recipe, calibration=IDS, quiet=True)
    assert find_blocks(model)[1][0].mlp.gate_up_proj.out_features == 2 * model.config.intermediate_size
