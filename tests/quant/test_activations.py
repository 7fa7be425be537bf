"""Activation (per-token) and KV-cache (per-head) fake quantization: maths, hooks, the pass, composition, export."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from tests.helpers import tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.pipeline.sequential import PipelineConfig
from compressor.passes.activations import ActivationQuantConfig
from compressor.runtime.activations import (
    KV_ATTENTION_PREFIX,
    ActivationQuantizer,
    KVQuantizer,
    activation_quantizers,
    quantizers_bypassed,
)
from compressor.passes import gptq as gptq_mod
from compressor.core.fake_quant import fake_quant_per_head, fake_quant_per_token
from compressor.core.arch import attention_modules
from compressor.runtime.online import OnlineHadamard
from compressor.algorithms.transforms.rotate import rotate_model

IDS = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
RTN4 = {"rtn": {"scheme": {"bits": 4, "group_size": -1}}}


def _logits(model, x=X, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def _rel_err(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _act(**cfg) -> dict:
    return {"quantize_activations": cfg}


def brute_per_token(x: torch.Tensor, bits: int, symmetric: bool, clip: float) -> torch.Tensor:
    """Token by token, the textbook formulas in x's own float32 arithmetic."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for t in range(rows.shape[0]):
        r = rows[t]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = r.abs().max() * clip / qmax
            s = torch.ones_like(s) if s == 0 else s
            out[t] = torch.clamp(torch.round(r / s), -qmax - 1, qmax) * s
        else:
            qmax = 2**bits - 1
            lo, hi = torch.clamp(r.min(), max=0) * clip, torch.clamp(r.max(), min=0) * clip
            s = (hi - lo) / qmax
            s = torch.ones_like(s) if s == 0 else s
            zp = torch.round(-lo / s)
            out[t] = (torch.clamp(torch.round(r / s) + zp, 0, qmax) - zp) * s
    return out.reshape(x.shape)


# ---------------------------------------------------------------- maths


@pytest.mark.parametrize("bits,sym,clip", list(itertools.product([2, 4, 8], [True, False], [1.0, 0.8])))
def test_per_token_matches_brute_force_and_lies_on_the_grid(bits, sym, clip):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 24, generator=g) * torch.rand(3, 5, 1, generator=g) * 4
    x[0, 0] = 0.0  # an all-zero token stays zero
    x[1, 1] = x[1, 1].abs() + 0.1  # an all-positive token (asymmetric: the range widens to 0)
    out = fake_quant_per_token(x, bits, symmetric=sym, clip_ratio=clip)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, brute_per_token(x, bits, sym, clip))
    assert torch.equal(out[0, 0], torch.zeros(24))
    rows = out.reshape(-1, 24)
    assert max(len(torch.unique(r)) for r in rows) <= 2**bits
    if clip == 1.0:  # nearest grid point: error at most half a step, and the extreme is exact when symmetric
        step = (x.abs().amax(-1) / (2 ** (bits - 1) - 1)) if sym else (
            (x.clamp(min=0).amax(-1) - x.clamp(max=0).amin(-1)) / (2**bits - 1))
        assert ((out - x).abs() <= step[..., None] / 2 * (1 + 1e-5) + 1e-7).all()


def test_clip_ratio_saturates_large_values():
    x = torch.linspace(-1, 1, 33).repeat(4, 1)  # (4, 33), absmax 1
    out = fake_quant_per_token(x, 8, clip_ratio=0.5)  # scale 0.5 / 127; codes [-128, 127]
    assert out.max() <= 0.5 + 1e-6 and out.min() >= -0.5 * 128 / 127 - 1e-6
    assert torch.allclose(out[:, -1], torch.full((4,), 0.5)) and torch.allclose(out[:, 0], torch.full((4,), -0.5 * 128 / 127))
    inner = x.abs() <= 0.49
    assert ((out - x).abs()[inner] <= 0.5 / 127).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_quantized_in_float32(dtype):
    x = (torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    for sym in (True, False):
        out = fake_quant_per_token(x, 4, symmetric=sym)
        assert out.dtype == dtype
        assert torch.equal(out, fake_quant_per_token(x.float(), 4, symmetric=sym).to(dtype))


def test_non_finite_token_comes_out_nan_without_raising():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    x[1, 3], ref = float("nan"), fake_quant_per_token(x[[0, 2]], 8)
    out = fake_quant_per_token(x, 8)
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[[0, 2]], ref)
    x[1, 3] = float("inf")
    assert torch.isnan(fake_quant_per_token(x, 8, symmetric=False)[1]).all()


def test_bad_arguments_name_the_fix():
    x = torch.randn(2, 8)
    for bits in (1, 17, True, 4.0):
        with pytest.raises(ValueError, match="integer from 2 to 16"):
            fake_quant_per_token(x, bits)
    for clip in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"ratio in \(0, 1\]"):
            fake_quant_per_token(x, 8, clip_ratio=clip)
    with pytest.raises(ValueError, match="float tensor"):
        fake_quant_per_token(torch.ones(2, 8, dtype=torch.int32), 8)


@pytest.mark.parametrize("group", [None, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_per_head_matches_per_token_reference(group, sym):
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) * 2  # (B, H, T, D)
    out = fake_quant_per_head(x, 4, symmetric=sym, group_size=group)
    g = group or 16
    ref = brute_per_token(x.reshape(2, 3, 5, 16 // g, g), 4, sym, 1.0).reshape(x.shape)
    assert out.shape == x.shape and torch.equal(out, ref)
    per_group = out.reshape(-1, g)
    assert max(len(torch.unique(r)) for r in per_group) <= 16


def test_per_head_rejects_bad_groups_and_shapes():
    x = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match=r"kv_group_size=5 does not divide head_dim=16: use one of \[1, 2, 4, 8, 16\]"):
        fake_quant_per_head(x, 4, group_size=5)
    with pytest.raises(ValueError, match="batch, heads, tokens, head_dim"):
        fake_quant_per_head(x[0], 4)


def test_quantizer_passes_gradients_straight_through():
    x = torch.randn(3, 8, requires_grad=True)
    out = ActivationQuantizer(4)(x)
    assert torch.equal(out, fake_quant_per_token(x.detach(), 4))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("sym", [True, False])
def test_range_grad_keeps_the_values_and_reaches_each_tokens_extremes(sym):
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    out = fake_quant_per_token(x, 4, symmetric=sym, range_grad=True)
    assert torch.equal(out.detach(), fake_quant_per_token(x.detach(), 4, symmetric=sym))
    # d sum(q²)/dx: identity STE would give 2q everywhere; through the scale the row's min / max get more
    (grad,) = torch.autograd.grad((out ** 2).sum(), x)
    differs = (grad - 2 * out.detach()).abs() > 1e-9
    extremes = (x == x.amax(dim=-1, keepdim=True)) | (x == x.amin(dim=-1, keepdim=True))
    assert differs.any(dim=-1).all()  # every token's scale gets a gradient ...
    assert not (differs & ~extremes).any()  # ... and only its extremes carry it
    assert not fake_quant_per_token(x.detach(), 4, symmetric=sym, range_grad=True).requires_grad


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensor_clip_ratio_matches_the_float_and_gets_a_gradient(sym, dtype):
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ratio = torch.tensor(0.8, requires_grad=True)
    out = fake_quant_per_token(x, 4, symmetric=sym, clip_ratio=ratio, range_grad=True)
    assert out.dtype == dtype  # half precision is quantized in float32, as with a float ratio
    assert torch.equal(out.detach(), fake_quant_per_token(x, 4, symmetric=sym, clip_ratio=0.8))
    (grad,) = torch.autograd.grad((out.float() - x.float()).pow(2).sum(), ratio)
    assert grad.abs() > 0
    for bad in (torch.tensor([0.8]), torch.tensor(1)):
        with pytest.raises(ValueError, match="0-d float tensor"):
            fake_quant_per_token(x, 4, clip_ratio=bad)


def test_kv_quantizer_with_range_grad_matches_and_is_differentiable():
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 5, 8, requires_grad=True), torch.randn(2, 3, 5, 8, requires_grad=True)
    plain, graded = KVQuantizer(4), KVQuantizer(4, range_grad=True)
    for a, b in zip(plain(k, v), graded(k, v)):
        assert torch.equal(a.detach(), b.detach())
    sum(t.pow(2).sum() for t in graded(k, v)).backward()
    assert k.grad is not None and not torch.equal(k.grad, 2 * graded(k, v)[0].detach())


# ---------------------------------------------------------------- the pass on a tiny Llama


def test_config_validation_and_round_trip():
    recipe = Recipe.from_dict({"passes": [RTN4, _act(bits=4, kv_bits=4, kv_group_size=8)]})
    name, cfg = recipe.passes[1]
    assert name == "quantize_activations"
    assert cfg == ActivationQuantConfig(bits=4, kv_bits=4, kv_group_size=8)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert cfg.kv_symmetric is False and cfg.symmetric is True and cfg.clip_ratio == 1.0
    bad = [({"bits": 1}, "integer from 2 to 16"), ({"kv_bits": 32}, "kv_bits=32"),
           ({"clip_ratio": 0}, r"ratio in \(0, 1\]"), ({"bits": None}, "nothing to do"),
           ({"kv_bits": 4, "kv_group_size": 0}, "positive divisor of head_dim"),
           ({"symmetric": "yes"}, "true/false"), ({"kv_bit": 4}, "did you mean 'kv_bits'")]
    for body, msg in bad:
        with pytest.raises(ValueError, match=msg):
            Recipe.from_dict({"passes": [_act(**body)]})


def test_error_shrinks_with_more_bits():
    ref = _logits(tiny_llama())
    errs = {}
    for bits in (16, 8, 4):
        model = tiny_llama()
        compress(model, Recipe.from_dict({"passes": [_act(bits=bits)]}), quiet=True)
        assert len(activation_quantizers(model)) == 14  # 7 linears x 2 blocks; lm_head never
        assert "input_quantizer" not in model.lm_head._modules
        errs[bits] = (_logits(model) - ref).abs().max().item()
    assert errs[16] < 1e-3
    assert errs[16] < errs[8] < errs[4]


def test_lm_head_is_never_quantized_even_when_targeted():
    model = tiny_llama(tie=False)
    compress(model, Recipe.from_dict({"passes": [_act(bits=8, ignore=[])]}), quiet=True)
    assert "input_quantizer" not in model.lm_head._modules
    with pytest.raises(ValueError, match="no Linear matches"):
        compress(tiny_llama(), Recipe.from_dict({"passes": [_act(bits=8, targets=["lm_head"])]}), quiet=True)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_quantization_changes_the_keys_attention_sees(impl):
    model = tiny_llama()
    model.config._attn_implementation = impl
    ref = _logits(model)
    compress(model, Recipe.from_dict({"passes": [_act(bits=None, kv_bits=4)]}), quiet=True)
    assert model.config._attn_implementation == KV_ATTENTION_PREFIX + impl
    attn = [m for _, m in attention_modules(model)]
    assert len(attn) == 2 and all("kv_quantizer" in m._modules for m in attn)
    seen = []
    attn[0].kv_quantizer.register_forward_hook(lambda _m, args, out: seen.append((args, out)))
    out = _logits(model)
    (k_in, v_in), (k_out, v_out) = seen[0]
    assert k_in.shape == (2, 2, 16, 16)  # (B, kv heads, T, head_dim), post-RoPE
    assert not torch.equal(k_in, k_out) and not torch.equal(v_in, v_out)
    assert torch.equal(k_out, fake_quant_per_head(k_in, 4)) and torch.equal(v_out, fake_quant_per_head(v_in, 4))
    assert 1e-3 < _rel_err(out, ref) < 0.5


def test_kv_quantization_sdpa_and_eager_agree_with_padding_and_cache():
    models = {}
    for impl in ("sdpa", "eager"):
        models[impl] = tiny_llama()
        models[impl].config._attn_implementation = impl
        compress(models[impl], Recipe.from_dict({"passes": [_act(bits=8, kv_bits=4, kv_group_size=8)]}), quiet=True)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the padded tokens must stay masked under our attention name
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = {impl: _logits(m, attention_mask=mask, position_ids=pos) for impl, m in models.items()}
    assert torch.allclose(outs["sdpa"][0], outs["eager"][0], atol=1e-4)
    assert torch.allclose(outs["sdpa"][1, 5:], outs["eager"][1, 5:], atol=1e-4)
    alone = _logits(models["sdpa"], X[1:, 5:])
    assert torch.allclose(outs["sdpa"][1, 5:], alone[0], atol=1e-4)
    # per-token scales: decoding with a KV cache gives the full forward's last logits
    model, full = models["sdpa"], _logits(models["sdpa"])
    with torch.no_grad():
        pre = model(X[:, :-1], use_cache=True)
        step = model(X[:, -1:], cache=pre.past_key_values, use_cache=True).logits
    assert torch.allclose(step[:, 0], full[:, -1], atol=1e-4)


def test_bad_kv_settings_are_refused():
    with pytest.raises(ValueError, match=r"self_attn: kv_group_size=5 does not divide head_dim=16"):
        compress(tiny_llama(), Recipe.from_dict({"passes": [_act(kv_bits=4, kv_group_size=5)]}), quiet=True)
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        compress(model, Recipe.from_dict({"passes": [_act(kv_bits=4)]}), quiet=True)
    assert activation_quantizers(model) == []  # refused before any change


# ---------------------------------------------------------------- composition


def test_down_proj_input_is_rotated_then_quantized():
    model = tiny_llama(hidden=48, inter=96)
    compress(model, Recipe.from_dict({"passes": [{"rotate": {"r4": True}}, _act(bits=4)]}), quiet=True)
    down = model.model.layers[0].mlp.down_proj
    assert list(down._modules) == ["input_transform", "input_quantizer"]
    raw, used = [], []
    down.register_forward_pre_hook(lambda _m, args: raw.append(args[0]), prepend=True)
    down.register_forward_hook(lambda _m, args, _out: used.append(args[0]))
    _logits(model)
    rotated = OnlineHadamard(96)(raw[0])
    assert torch.equal(used[0], fake_quant_per_token(rotated, 4))
    assert not torch.equal(used[0], OnlineHadamard(96)(fake_quant_per_token(raw[0], 4)))


def test_rotating_after_quantizing_activations_is_refused_at_run_time():
    model = tiny_llama(hidden=48, inter=96)
    compress(model, Recipe.from_dict({"passes": [_act(bits=8)]}), quiet=True)
    rotate_model(model)
    with pytest.raises(ValueError, match="attached after its input_quantizer.*rotate the model first"):
        _logits(model)


def test_deepcopy_and_pickle_keep_the_quantizers():
    model = tiny_llama(hidden=48, inter=96)
    recipe = Recipe.from_dict({"passes": [{"rotate": {}}, RTN4, _act(bits=4, kv_bits=4)]})
    compress(model, recipe, quiet=True)
    ref = _logits(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert activation_quantizers(clone) == activation_quantizers(model)
        assert clone.config._attn_implementation == KV_ATTENTION_PREFIX + "sdpa"
        assert torch.equal(_logits(clone), ref)


@pytest.mark.parametrize("order", ["after", "before"])
def test_with_gptq_in_the_block_pipeline(order):
    model = tiny_llama(hidden=48, inter=96)
    ref = _logits(model)
    gptq, act = {"gptq": {"scheme": {"bits": 4, "group_size": -1}}}, _act(bits=8, kv_bits=8)
    passes = [{"rotate": {}}, gptq, act] if order == "after" else [{"rotate": {}}, act, gptq]
    compress(model, Recipe.from_dict({"passes": passes}), calibration=IDS,
             pipeline=PipelineConfig(batch_size=3, quiet=True))
    assert len(activation_quantizers(model)) == 14 + 2  # linears + attention modules
    assert all(getattr(model.model.layers[i].mlp.down_proj, "quant_scheme", None) is not None for i in range(2))
    out = _logits(model)
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 0.2


def test_bypassed_quantizers_pass_inputs_unchanged_and_come_back():
    model = tiny_llama(hidden=48, inter=96)
    ref = _logits(model)
    compress(model, Recipe.from_dict({"passes": [_act(bits=4, kv_bits=4)]}), quiet=True)
    quantized = _logits(model)
    assert _rel_err(quantized, ref) > 1e-3
    with quantizers_bypassed(model) as n:
        assert n == 14 + 2  # linears + attention modules
        torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)
    assert torch.equal(_logits(model), quantized)
    with pytest.raises(RuntimeError, match="boom"), quantizers_bypassed(model):
        raise RuntimeError("boom")
    assert torch.equal(_logits(model), quantized)  # restored on the way out of an error too


def test_gptaq_after_quantize_activations_pairs_fp_inputs_with_quantized_ones(monkeypatch):
    """quantize_activations before GPTAQ: the compressed stream's q_proj inputs are quantized, the full-precision
    stream's are what the uncompressed model computes (GPTAQ's target W x, arXiv 2504.02692)."""
    seen: dict[str, list[torch.Tensor]] = {"fp": [], "compressed": []}
    real = gptq_mod.GPTQPass._observe

    def spy(self, name, x):
        if name == "model.layers.0.self_attn.q_proj":
            seen[self.stream].append(x.detach().reshape(-1, x.shape[-1]).clone())
        return real(self, name, x)

    monkeypatch.setattr(gptq_mod.GPTQPass, "_observe", spy)
    fp = tiny_llama(hidden=48, inter=96)
    xs = []
    handle = fp.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(0, IDS.shape[0], 3):
            fp(IDS[i:i + 3])
    handle.remove()
    x = torch.cat(xs)
    model = tiny_llama(hidden=48, inter=96)
    gptaq = {"gptq": {"scheme": {"bits": 4, "group_size": -1}, "asymmetric": True}}
    compress(model, Recipe.from_dict({"passes": [_act(bits=4, kv_bits=4), gptaq]}), calibration=IDS,
             pipeline=PipelineConfig(batch_size=3, quiet=True))
    torch.testing.assert_close(torch.cat(seen["fp"]), x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(seen["compressed"]), fake_quant_per_token(x, 4, symmetric=True),
                               rtol=1e-5, atol=1e-6)
    assert all(not q.bypass for q in model.modules() if isinstance(q, (ActivationQuantizer, KVQuantizer)))


def test_block_checkpoints_are_refused(tmp_path):
    recipe = Recipe.from_dict({"passes": [{"gptq": {"scheme": {"bits": 4, "group_size": -1}}}, _act(bits=8)]})
    with pytest.raises(ValueError, match="does not support checkpoint_dir"):
        compress(tiny_llama(), recipe, calibration=IDS, pipeline=PipelineConfig(checkpoint_dir=tmp_path, quiet=True))


# ---------------------------------------------------------------- export


def test_export_records_the_quantizers(tmp_path):
    """input_activations / kv_cache_scheme in the config; the reload reattaches them (more in tests/export)."""
    recipe = Recipe.from_dict({"passes": [RTN4, _act(bits=8, kv_bits=8)]})
    model = compress(tiny_llama(), recipe, output=tmp_path / "e", quiet=True)
    loaded = load_compressed(tmp_path / "e")
    assert activation_quantizers(loaded) == activation_quantizers(model)
    assert torch.equal(_logits(loaded), _logits(model))
    weights_only_mlp = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": -1},
                                                             "ignore": ["lm_head", "re:.*mlp.*"]}}, _act(bits=8)]})
    model = compress(tiny_llama(), weights_only_mlp, quiet=True)
    with pytest.raises(ValueError, match="gate_proj: its input is quantized but its weight is not.*same targets"):
        save_compressed(model, tmp_path / "e2", recipe=weights_only_mlp)
    assert not (tmp_path / "e2").exists()
