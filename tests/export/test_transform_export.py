"""W4A8 and W4A4KV4 exports with online Hadamard transforms (R4, R3): config, stored matrices, bit-exact reload, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.export import compressed_tensors as ct_export
from compressor.runtime.quant_linear import QuantLinear
from compressor.export.online_read import StoredHadamard
from compressor.pipeline.sequential import PipelineConfig
from compressor.runtime.activations import (
    KV_ATTENTION_PREFIX, KVQuantizer, activation_quantizers, qk_rotations,
)
from compressor.core.arch import attention_modules
from compressor.core.hadamard import hadamard_matrix
from compressor.runtime.online import OnlineHadamard, online_transforms

IDS = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
ROTATE = {"rotate": {"r3": True, "r4": True}}
RTN4 = {"rtn": {"scheme": {"bits": 4, "group_size": 32}}}
GPTQ4 = {"gptq": {"scheme": {"bits": 4, "group_size": -1}}}
W4A8 = {"quantize_activations": {"bits": 8}}
W4A4KV4 = {"quantize_activations": {"bits": 4, "kv_bits": 4}}
R4_KEY = "model.layers.0.mlp.down_proj.R4_input.weight"
R3_KEY = "model.layers.0.self_attn.R3_q_attn.weight"


def _logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def _qcfg(out) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def _compressed(*passes, hidden=64, calibration=None):
    """A tiny Llama (inter 80 = 4 * 20: a Paley R4 matrix; head_dim hidden/4) compressed by ``passes``."""
    recipe = Recipe.from_dict({"passes": list(passes)})
    model = compress(tiny_llama(hidden=hidden), recipe, calibration=calibration, quiet=True,
                     pipeline=PipelineConfig(batch_size=3, quiet=True) if calibration is not None else None)
    return model, recipe


# ---------------------------------------------------------------- reload


def test_w4a8_with_r3_r4_reloads_bit_exact(tmp_path):
    model, recipe = _compressed(ROTATE, RTN4, W4A8)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    loaded = load_compressed(out)
    assert torch.equal(_logits(loaded), ref)  # same transforms, same quantizers, same kernels: bit for bit
    down = loaded.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and list(down._modules) == ["input_transform", "input_quantizer"]
    assert isinstance(down.input_transform, OnlineHadamard) and down.input_transform.size == 80
    assert activation_quantizers(loaded) == activation_quantizers(model)  # 14 linears, no KV
    assert len(qk_rotations(loaded)) == 2 and loaded.config._attn_implementation == KV_ATTENTION_PREFIX + "sdpa"
    q = _qcfg(out)
    group = q["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and q["ignore"] == ["lm_head"]
    a = group["input_activations"]
    assert (a["num_bits"], a["type"], a["symmetric"], a["strategy"], a["dynamic"]) == (8, "int", True, "token", True)
    assert q["kv_cache_scheme"] is None
    assert q["compressor"] == {"version": 1, "attn_implementation": "sdpa"}  # clip 1.0: nothing extra
    r4, r3 = q["transform_config"]["config_groups"]["R4"], q["transform_config"]["config_groups"]["R3"]
    downs = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert r4["type"] == "random-hadamard" and r4["head_dim"] is None and not r4["randomize"]  # 80: not Sylvester
    assert [(x["location"], x["inverse"], x["targets"]) for x in r4["apply"]] == [
        ("input", False, downs), ("weight_input", True, downs)]
    assert r3["type"] == "hadamard" and r3["head_dim"] == 16  # 16 = 2^4: Sylvester, as compressed-tensors builds it
    assert [x["location"] for x in r3["apply"]] == ["q_attn", "k_cache"]
    sd = load_file(out / "model.safetensors")
    assert [k for k in sd if "_input.weight" in k or "_q_attn" in k] == [R4_KEY, R3_KEY]  # once per group and size
    assert sd[R4_KEY].dtype == torch.float32 and torch.equal(sd[R4_KEY], hadamard_matrix(80, dtype=torch.float32).T)
    assert torch.equal(sd[R3_KEY], hadamard_matrix(16, dtype=torch.float32))
    x = torch.randn(3, 80, dtype=torch.float64)
    assert torch.allclose(x @ sd[R4_KEY].double() / 80**0.5, OnlineHadamard(80)(x))  # forward = x H / √n


def test_w4a4kv4_gptq_compress_with_output_reloads_bit_exact(tmp_path):
    recipe = Recipe.from_dict({"passes": [ROTATE, GPTQ4, W4A4KV4]})
    model = compress(tiny_llama(hidden=48), recipe, calibration=IDS, output=tmp_path / "e", quiet=True,
                     pipeline=PipelineConfig(batch_size=3, quiet=True))  # head_dim 12: a Paley R3 matrix
    loaded = load_compressed(tmp_path / "e")
    assert torch.equal(_logits(loaded), _logits(model))
    attn = [m for _, m in attention_modules(loaded)]
    assert all(isinstance(m.kv_quantizer, KVQuantizer) and m.kv_quantizer.bits == 4 for m in attn)
    assert all(isinstance(m.qk_rotation.hadamard, OnlineHadamard) for m in attn)
    q = _qcfg(tmp_path / "e")
    kv = q["kv_cache_scheme"]
    assert (kv["num_bits"], kv["symmetric"], kv["strategy"], kv["group_size"], kv["dynamic"]) == (4, False, "group", 12, True)
    assert q["compressor"]["kv_cache"] == {"num_bits": 4, "symmetric": False, "group_size": None}
    assert q["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4
    assert q["transform_config"]["config_groups"]["R3"]["type"] == "random-hadamard"  # 12 is not a power of two
    assert json.loads((tmp_path / "e" / "compressor_manifest.json").read_text())["recipe"] == recipe.to_dict()


def test_online_o_proj_and_down_proj_share_the_r4_group_and_reload(tmp_path):
    """Two sizes in one group (o_proj 48, down_proj 80): one stored matrix per size, bit-exact reload."""
    model, recipe = _compressed({"rotate": {"r3": True, "online_o": True}}, RTN4, W4A4KV4, hidden=48)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    loaded = load_compressed(out)
    assert torch.equal(_logits(loaded), _logits(model))
    rotated = sorted(n for n, m in loaded.named_modules() if isinstance(m._modules.get("input_transform"), OnlineHadamard))
    assert rotated == sorted(online_transforms(model)) and len(rotated) == 4  # QuantLinears on reload
    r4 = _qcfg(out)["transform_config"]["config_groups"]["R4"]
    assert len(r4["apply"][0]["targets"]) == 4
    sd = load_file(out / "model.safetensors")
    stored = {k: tuple(v.shape) for k, v in sd.items() if "R4_input" in k}
    assert stored == {R4_KEY: (80, 80), "model.layers.0.self_attn.o_proj.R4_input.weight": (48, 48)}


def test_clip_ratio_group_size_and_mixed_groups(tmp_path):
    """Quantized linears with and without input quantizers get separate groups; clip and KV groups round-trip."""
    act = {"quantize_activations": {"bits": 6, "symmetric": False, "clip_ratio": 0.9, "kv_bits": 4,
                                    "kv_symmetric": True, "kv_group_size": 8, "targets": ["re:.*mlp.*"]}}
    model, recipe = _compressed(ROTATE, RTN4, act)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    q = _qcfg(out)
    groups = q["config_groups"]
    with_act = [g for g, v in groups.items() if v["input_activations"]]
    assert len(groups) == 2 and len(with_act) == 1
    assert sorted(groups[with_act[0]]["targets"]) == sorted(n for n, _ in model.named_modules() if "mlp." in n
                                                            and isinstance(_, nn.Linear))
    assert q["compressor"]["input_activations"] == {with_act[0]: {"clip_ratio": 0.9}}
    assert q["kv_cache_scheme"]["group_size"] == 8 and q["kv_cache_scheme"]["symmetric"] is True
    loaded = load_compressed(out)
    assert loaded.model.layers[1].mlp.up_proj.input_quantizer.clip_ratio == 0.9
    assert "input_quantizer" not in loaded.model.layers[1].self_attn.q_proj._modules
    assert torch.equal(_logits(loaded), ref)


def test_online_transform_on_an_unquantized_linear_reloads(tmp_path):
    """R4 on a down_proj kept in full precision: stored as a plain weight, the transform still recorded and reattached."""
    rtn = {"rtn": {"scheme": {"bits": 4, "group_size": 32}, "ignore": ["lm_head", "re:.*down_proj"]}}
    model, recipe = _compressed({"rotate": {"r4": True}}, rtn)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    loaded = load_compressed(out)
    down = loaded.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and online_transforms(loaded) == online_transforms(model)
    assert torch.equal(_logits(loaded), _logits(model))


def test_loader_uses_the_stored_matrix(tmp_path):
    """A matrix that is not ours (a sign-flipped column) is applied as stored, densely: x W / √n."""
    model, recipe = _compressed(ROTATE, RTN4, W4A8)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    sd = load_file(out / "model.safetensors")
    w = sd[R4_KEY].clone()
    w[:, 3] *= -1
    sd[R4_KEY] = w
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="sha256"):
        load_compressed(out)
    loaded = load_compressed(out, verify=False)
    t = loaded.model.layers[1].mlp.down_proj.input_transform  # shared by every target, as compressed-tensors stores it
    assert isinstance(t, StoredHadamard) and torch.equal(t.weight, w)
    x = torch.randn(2, 5, 80)
    assert torch.allclose(t(x), x @ w / 80**0.5, atol=1e-6)
    assert torch.allclose(StoredHadamard(hadamard_matrix(80).T)(x), OnlineHadamard(80)(x), atol=1e-6)
    assert not torch.equal(_logits(loaded), _logits(model))


def test_config_parses_with_compressed_tensors(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    model, recipe = _compressed(ROTATE, RTN4, W4A4KV4)
    q = _qcfg(save_compressed(model, tmp_path / "e", recipe=recipe))
    parsed = QuantizationConfig.model_validate(q)  # extra top-level keys (compressor, transform_config) are ignored
    assert parsed.kv_cache_scheme.strategy == "group" and parsed.kv_cache_scheme.dynamic is True
    assert parsed.config_groups["group_0"].input_activations.strategy == "token"
    tc = TransformConfig.model_validate(q["transform_config"])
    assert tc.config_groups["R4"].apply[0].location == "input" and tc.config_groups["R3"].head_dim == 16


# ---------------------------------------------------------------- refusals


def test_unsupported_models_are_refused_and_nothing_is_written(tmp_path):
    model, recipe = _compressed(ROTATE, RTN4, W4A4KV4)
    attn1, down0 = model.model.layers[1].self_attn, model.model.layers[0].mlp.down_proj
    kv = attn1._modules.pop("kv_quantizer")  # KV quantized in one layer only
    with pytest.raises(ValueError, match="layers.1.self_attn: has no kv_quantizer.*of every layer"):
        save_compressed(model, tmp_path / "e", recipe=recipe)
    attn1.add_module("kv_quantizer", KVQuantizer(8))  # two KV settings
    with pytest.raises(ValueError, match="different settings.*with the same settings"):
        save_compressed(model, tmp_path / "e", recipe=recipe)
    attn1.add_module("kv_quantizer", kv)
    down0.add_module("input_transform", nn.Identity())  # an online transform that is not a Hadamard
    with pytest.raises(ValueError, match="down_proj: its online input_transform is a Identity.*r4=false"):
        save_compressed(model, tmp_path / "e", recipe=recipe)
    assert list(tmp_path.iterdir()) == []


def test_partial_activation_quantization_is_refused_before_writing(tmp_path):
    rtn = {"rtn": {"scheme": {"bits": 4, "group_size": 32}, "ignore": ["lm_head", "re:.*down_proj"]}}
    recipe = Recipe.from_dict({"passes": [ROTATE, rtn, W4A8]})
    with pytest.raises(ValueError, match="down_proj: its input is quantized but its weight is not.*same targets"):
        compress(tiny_llama(), recipe, output=tmp_path / "e", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model, recipe = _compressed(ROTATE, RTN4, W4A4KV4)

    def boom(*a, **k):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(ct_export, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk vanished"):
        save_compressed(model, tmp_path / "e", recipe=recipe)
    assert list(tmp_path.iterdir()) == []


def _edit_config(out, edit) -> None:
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))


def _static_kv(q: dict) -> None:
    del q["compressor"]
    q["kv_cache_scheme"].update(strategy="tensor", dynamic=False)


def _r4(**kw):
    return lambda q: q["transform_config"]["config_groups"]["R4"].update(**kw)


def _output_location(q: dict) -> None:
    q["transform_config"]["config_groups"]["R4"]["apply"][0]["location"] = "output"


def _static_inputs(q: dict) -> None:
    q["config_groups"]["group_0"]["input_activations"].update(strategy="tensor", dynamic=False)


@pytest.mark.parametrize("edit,msg", [
    (_static_kv, "kv_cache_scheme .* not supported.*dynamic integer per-token"),
    (_r4(type="random-matrix"), "type 'random-matrix'.*Hadamard transforms"),
    (_r4(randomize=True), "randomize: true"),
    (_output_location, "applies at 'output'"),
    (_static_inputs, "input_activations .* not supported.*per-token"),
])
def test_loader_refuses_what_it_cannot_run(tmp_path, edit, msg):
    model, recipe = _compressed(ROTATE, RTN4, W4A4KV4)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    _edit_config(out, edit)
    with pytest.raises(ValueError, match=msg):
        load_compressed(out, verify=False)


def test_loader_reads_kv_settings_from_kv_cache_scheme_alone(tmp_path):
    """A compressed-tensors dynamic group KV scheme without our extension loads (group_size = head_dim: the whole head)."""
    model, recipe = _compressed(RTN4, {"quantize_activations": {"bits": None, "kv_bits": 4}})
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    _edit_config(out, lambda q: q.pop("compressor"))
    loaded = load_compressed(out, verify=False)
    assert loaded.model.layers[0].self_attn.kv_quantizer.group_size == 16
    assert torch.equal(_logits(loaded), _logits(model))


def test_learned_clip_ratios_export_per_group_and_reload(tmp_path):
    """OSTQuant's learned per-linear clip ratios become one config group each and reload bit-exactly."""
    from compressor.algorithms.transforms.ostquant import OSTQuantConfig, ostquant_model

    model = tiny_llama(hidden=48)
    ostquant_model(model, IDS, OSTQuantConfig(steps=4, samples=4, top_k=40, lr=2e-2, lr_scale=2e-2, qsur_samples=0,
                                              learn_clip=True, lr_clip=5e-2), quiet=True)
    recipe = Recipe.from_dict({"passes": [RTN4, W4A4KV4]})
    model = compress(model, recipe, quiet=True)
    ratios = {n: m.input_quantizer.clip_ratio for n, m in model.named_modules() if "input_quantizer" in m._modules}
    assert len(set(ratios.values())) > 1 and min(ratios.values()) < 1.0
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    q = _qcfg(out)
    ext = q["compressor"]["input_activations"]  # groups at ratio 1.0 need no entry
    stored = {t: ext.get(g, {}).get("clip_ratio", 1.0)
              for g, v in q["config_groups"].items() for t in v["targets"]}
    assert stored == ratios
    loaded = load_compressed(out)
    assert {n: m.input_quantizer.clip_ratio for n, m in loaded.named_modules()
            if "input_quantizer" in m._modules} == ratios
    assert torch.equal(_logits(loaded), _logits(model))
