"""R3: the online Hadamard on queries and keys after RoPE, exact alone, before the KV quantizer, exported."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from tests.helpers import tiny_llama
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.runtime.activations import (
    KV_ATTENTION_PREFIX, KVQuantizer, QKRotation, attach_kv_quantizer, attach_qk_rotation, qk_rotations,
)
from compressor.core.fake_quant import fake_quant_per_head
from compressor.core.arch import attention_modules
from compressor.core.hadamard import normalized_hadamard
from compressor.runtime.online import online_transforms
from compressor.algorithms.transforms.rotate import rotate_model
from compressor.passes.rotate import RotateConfig

X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
RTN4 = {"rtn": {"scheme": {"bits": 4, "group_size": -1}}}
KV4 = {"quantize_activations": {"bits": None, "kv_bits": 4}}


def _logits(model, x=X, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def _randomize_norms(model) -> None:
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = torch.rand(p.shape, generator=g) + 0.5


def _model(impl: str, hidden: int = 48):
    model = tiny_llama(hidden=hidden, inter=96)
    model.config._attn_implementation = impl
    _randomize_norms(model)
    return model


def _r3_alone(model) -> None:
    """Only R3: no fused rotation at all, so nothing else can hide a missing or wrong R3."""
    for _, attn in attention_modules(model):
        attach_qk_rotation(attn, QKRotation(attn.head_dim))


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("hidden", [48, 64])  # head_dim 12 = 12 (Paley I, not a power of two) and 16 = 2^4
@pytest.mark.parametrize("how", ["r3 alone", "rotate r1+r3", "rotate r1+r2+r3+r4"])
def test_r3_keeps_the_fp32_logits(impl, hidden, how):
    model = _model(impl, hidden)
    ref = _logits(model)
    if how == "r3 alone":
        _r3_alone(model)
    else:
        full = how.endswith("r4")
        info = rotate_model(model, r3=True, r2=full, r4=full)
        assert info["r3"] == hidden // 4 and info["online"] == 2 + 2 * full
    assert model.config._attn_implementation == KV_ATTENTION_PREFIX + impl
    assert len(qk_rotations(model)) == 2
    diff = (_logits(model) - ref).abs().max().item()
    assert diff <= 1e-3  # the criterion
    assert diff <= 1e-5 * ref.abs().max().item()  # fp32 round-off in fact


def test_r3_on_qwen3_with_qk_norms_and_its_own_head_dim():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=20, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()  # head_dim 20 ≠ 48 / 4 (Paley I, q = 19)
    ref = _logits(model)
    assert rotate_model(model, r3=True)["r3"] == 20
    assert (_logits(model) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


# ---------------------------------------------------------------- R3 then KV quantization


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_quantizer_sees_the_rotated_keys(impl):
    model = _model(impl)
    compress(model, Recipe.from_dict({"passes": [{"rotate": {"r3": True}}, KV4]}), quiet=True)
    attn = model.model.layers[0].self_attn
    assert list(attn._modules)[-2:] == ["qk_rotation", "kv_quantizer"]
    k_lin, v_lin, seen = [], [], []
    attn.k_proj.register_forward_hook(lambda _m, _a, out: k_lin.append(out))
    attn.v_proj.register_forward_hook(lambda _m, _a, out: v_lin.append(out))
    attn.kv_quantizer.register_forward_hook(lambda _m, args, out: seen.append((args, out)))
    _logits(model)
    (k_in, v_in), (k_out, v_out) = seen[0]
    # by hand: k_proj output → heads → RoPE → x @ Hᵀ/√12 (QuaRot's online Hadamard)
    pos = torch.arange(X.shape[1])[None]
    cos, sin = model.model.rotary_emb(k_lin[0], pos)
    k = k_lin[0].view(2, 16, 2, 12).transpose(1, 2)  # (B, kv heads, T, head_dim)
    _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)
    k_rot = k_rope @ normalized_hadamard(12, dtype=torch.float32).T
    torch.testing.assert_close(k_in, k_rot, rtol=0, atol=1e-5)
    assert (k_in - k_rope).abs().max() > 0.1  # it is not the unrotated key
    assert torch.equal(v_in, v_lin[0].view(2, 16, 2, 12).transpose(1, 2))  # R3 leaves values alone
    assert torch.equal(k_out, fake_quant_per_head(k_in, 4)) and torch.equal(v_out, fake_quant_per_head(v_in, 4))


def test_r3_order_does_not_depend_on_attachment_order():
    """KV quantizer attached first, R3 second: the attention function still rotates before quantizing."""
    a, b = _model("sdpa"), _model("sdpa")
    for first in (True, False):
        model = a if first else b
        for _, attn in attention_modules(model):
            if first:
                attach_qk_rotation(attn, QKRotation(attn.head_dim))
            attach_kv_quantizer(attn, KVQuantizer(4))
            if not first:
                attach_qk_rotation(attn, QKRotation(attn.head_dim))
    assert torch.equal(_logits(a), _logits(b))


def _outlier_keys(model, head_dim: int) -> None:
    """One large channel pair per key head (channels c and c + D/2 share a RoPE frequency)."""
    for layer in model.model.layers:
        w = layer.self_attn.k_proj.weight.data.view(2, head_dim, -1)  # (kv heads, head_dim, hidden)
        w[:, [3, 3 + head_dim // 2]] *= 25.0


def test_r3_reduces_the_kv4_key_error_on_outlier_keys():
    """Head_dim 64 as SmolLM2; ‖Q(k) − k‖ / ‖k‖ is rotation-invariant, so the two runs compare in one measure."""
    errs = {}
    for r3 in (False, True):
        model = _model("sdpa", hidden=256)
        _outlier_keys(model, 64)
        compress(model, Recipe.from_dict({"passes": [{"rotate": {"r3": r3}}, KV4]}), quiet=True)
        seen = []
        for layer in model.model.layers:
            layer.self_attn.kv_quantizer.register_forward_hook(lambda _m, args, out: seen.append((args[0], out[0])))
        _logits(model)
        errs[r3] = max(((q - k).norm() / k.norm()).item() for k, q in seen)
    assert errs[True] < 0.6 * errs[False], errs  # measured 0.064 vs 0.154


def test_decoding_with_a_cache_matches_the_full_forward():
    model = _model("sdpa")
    compress(model, Recipe.from_dict({"passes": [{"rotate": {"r3": True}}, KV4]}), quiet=True)
    full = _logits(model)
    with torch.no_grad():
        pre = model(X[:, :-1], use_cache=True)
        step = model(X[:, -1:], cache=pre.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=0, atol=1e-4)


def test_quantize_activations_hints_at_r3(caplog):
    with caplog.at_level(logging.INFO, logger="compressor.passes.activations"):
        compress(_model("sdpa"), Recipe.from_dict({"passes": [{"rotate": {}}, KV4]}), quiet=True)
    assert "rotated without r3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="compressor.passes.activations"):
        compress(_model("sdpa"), Recipe.from_dict({"passes": [{"rotate": {"r3": True}}, KV4]}), quiet=True)
    assert "rotated without r3" not in caplog.text


# ---------------------------------------------------------------- copies, config, refusals


def test_deepcopy_and_pickle_keep_r3():
    model = _model("eager")
    keys = set(model.state_dict())
    rotate_model(model, r3=True, r4=False)
    assert set(model.state_dict()) == keys  # the Hadamard factor is a non-persistent buffer
    model = _model("eager")
    compress(model, Recipe.from_dict({"passes": [{"rotate": {"r3": True}}, RTN4, KV4]}), quiet=True)
    ref = _logits(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert qk_rotations(clone) == qk_rotations(model) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert clone.config._attn_implementation == KV_ATTENTION_PREFIX + "eager"
        assert torch.equal(_logits(clone), ref)


def test_config_default_and_round_trip():
    assert RotateConfig().r3 is False
    recipe = Recipe.from_dict({"passes": [{"rotate": {"r3": True, "r4": False}}, RTN4]})
    assert recipe.passes[0][1] == RotateConfig(r3=True, r4=False)
    assert recipe.to_dict()["passes"][0]["rotate"]["r3"] is True
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="rotate.r3 must be true or false"):
        RotateConfig(r3="yes")


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_refusals_leave_the_model_intact():
    model = _model("sdpa")
    model.config._attn_implementation = "flex_attention"
    before = _weights(model)
    with pytest.raises(ValueError, match="rotate: model.layers.0.self_attn: .*attn_implementation='sdpa' or 'eager'"):
        rotate_model(model, r3=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = tiny_llama(hidden=56, inter=96)  # head_dim 14 = 2 * 7: no Hadamard matrix
    before = _weights(model)
    with pytest.raises(ValueError, match="size 14: supported sizes"):
        rotate_model(model, r1="random", r3=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not qk_rotations(model)
    model = _model("sdpa")
    _r3_alone(model)
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(model)
    with pytest.raises(ValueError, match="already has a qk_rotation"):
        _r3_alone(model)
    with pytest.raises(ValueError, match="head_dim=12, but the R3 rotation is 16 wide"):
        attach_qk_rotation(tiny_llama(hidden=48).model.layers[0].self_attn, QKRotation(16))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_r3_exports_and_reloads(tmp_path, impl):
    """R3 goes into transform_config (group R3, q_attn + k_cache); the reload rotates again: same logits."""
    recipe = Recipe.from_dict({"passes": [{"rotate": {"r3": True, "r4": False}}, RTN4]})
    model = compress(_model(impl), recipe, quiet=True)  # head_dim 12: a Paley matrix, stored in the export
    assert not online_transforms(model) and len(qk_rotations(model)) == 2
    ref = _logits(model)
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    assert len(qk_rotations(loaded)) == 2 and loaded.config._attn_implementation == KV_ATTENTION_PREFIX + impl
    assert torch.equal(_logits(loaded), ref)
    both = Recipe.from_dict({"passes": [{"rotate": {"r3": True}}, RTN4]})
    out = compress(_model(impl), both, output=tmp_path / "e2", quiet=True)
    assert torch.equal(_logits(load_compressed(tmp_path / "e2")), _logits(out))
