"""FP8, NVFP4 and MXFP4 weight exports: compressed-tensors layouts, bit-exact reload, compressed-tensors' own
decompressors, transformers, the CLI presets and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.core.scheme import QuantScheme, global_scale
from compressor.core.state import quant_state
from compressor.export import compressed_tensors as ct_export
from compressor.export.summary import summarize
from compressor.runtime.float_linear import FloatQuantLinear

X = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
SCHEMES = {
    "fp8": ({"type": "float", "bits": 8, "group_size": -1, "symmetric": True}, "float-quantized"),
    "fp8-tensor": ({"type": "float", "bits": 8, "group_size": -1, "symmetric": True, "block_rows": -1},
                   "float-quantized"),
    "nvfp4": ({"type": "float", "bits": 4, "group_size": 16, "symmetric": True, "scale_format": "e4m3"},
              "nvfp4-pack-quantized"),
    "mxfp4": ({"type": "float", "bits": 4, "group_size": 32, "symmetric": True, "scale_format": "e8m0"},
              "mxfp4-pack-quantized"),
}


def _model(name, method="rtn", dtype=torch.float32, **extra):
    model = tiny_llama(inter=96).to(dtype)
    recipe = Recipe.from_dict({"passes": [{method: {"scheme": SCHEMES[name][0], **extra}}]})
    calibration = None
    if method == "gptq":
        calibration = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    compress(model, recipe, calibration=calibration, quiet=True)
    return model, recipe


def _logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_float_export_has_the_compressed_tensors_layout_and_reloads_bit_exactly(tmp_path, name, method):
    model, recipe = _model(name, method)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = SCHEMES[name][1]
    assert qcfg["format"] == fmt and qcfg["config_groups"]["group_0"]["weights"]["type"] == "float"
    sd = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.down_proj"  # (64, 96)
    if name.startswith("fp8"):
        assert sd[f"{key}.weight"].dtype == torch.float8_e4m3fn and sd[f"{key}.weight"].shape == (64, 96)
        # per channel (N, 1); per tensor (1,), compressed-tensors' tensor strategy
        assert sd[f"{key}.weight_scale"].shape == ((1,) if name == "fp8-tensor" else (64, 1))
        strategy = qcfg["config_groups"]["group_0"]["weights"]["strategy"]
        assert strategy == ("tensor" if name == "fp8-tensor" else "channel")
    else:
        assert sd[f"{key}.weight_packed"].dtype == torch.uint8 and sd[f"{key}.weight_packed"].shape == (64, 48)
        scale = sd[f"{key}.weight_scale"]
        assert scale.shape == (64, 96 // SCHEMES[name][0]["group_size"])
        assert scale.dtype == (torch.float8_e4m3fn if name == "nvfp4" else torch.uint8)
        assert (f"{key}.weight_global_scale" in sd) == (name == "nvfp4")
    loaded = load_compressed(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, FloatQuantLinear)
    assert torch.equal(_logits(loaded), ref)
    info = summarize(out)
    assert info["quantized_layers"] == 14
    assert any(r.startswith("vLLM (CPU: no") for r in info["loaders"])  # vLLM 0.32's CPU build has no such kernel
    assert 4 < info["bits_per_weight"] < (9 if name.startswith("fp8") else 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_compressed_tensors_decompresses_our_float_tensors_to_our_weights(name, dtype):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    compressor = {"fp8": FloatQuantizationCompressor, "fp8-tensor": FloatQuantizationCompressor,
                  "nvfp4": NVFP4PackedCompressor,
                  "mxfp4": MXFP4PackedCompressor}[name]
    model, _ = _model(name, dtype=dtype)
    for module in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        args = ct_export.scheme_to_ct_args(quant_state(module)[0])
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
        out = compressor.decompress(ct_export.compress_module_state(module, SCHEMES[name][1]), scheme)["weight"]
        # compressed-tensors decompresses FP4 to bfloat16: our weight rounded to it is theirs, exactly
        assert torch.equal(out, module.weight.to(out.dtype))
        if out.dtype == dtype:
            assert torch.equal(out, module.weight)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_transformers_loads_our_float_exports(tmp_path, name):
    from transformers import AutoModelForCausalLM

    model, recipe = _model(name, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(save_compressed(model, tmp_path / "e", recipe=recipe), dtype=torch.bfloat16)
    got, ref = _logits(hf), _logits(model)
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 0.01


def test_cli_presets_compress_and_reload(tmp_path, tiny_model_dir, caplog):
    from compressor.cli import main

    for preset, fmt in (("w4a16-nvfp4", "nvfp4-pack-quantized"), ("w8a16-fp8", "float-quantized"),
                        ("fp8-tensor", "float-quantized")):
        out = tmp_path / preset
        assert main(["compress", str(tiny_model_dir), "--scheme", preset, "-o", str(out), "-q"]) == 0
        assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == fmt
        assert isinstance(load_compressed(out).model.layers[0].mlp.up_proj, FloatQuantLinear)
    assert main(["compress", str(tiny_model_dir), "--scheme", "w4a16-mxfp4", "--group-size", "64", "-o",
                 str(tmp_path / "x"), "-q"]) != 0
    assert "fixed group size" in caplog.text and not (tmp_path / "x").exists()


def test_float_schemes_without_a_format_or_pass_are_refused(tmp_path):
    model = tiny_llama(inter=96)
    odd = {"type": "float", "bits": 4, "group_size": 32, "symmetric": True, "scale_format": "e4m3"}
    compress(model, Recipe.from_dict({"passes": [{"rtn": {"scheme": odd}}]}), quiet=True)
    with pytest.raises(ValueError, match="NVFP4 .bits 4, group_size 16"):
        save_compressed(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    with pytest.raises(ValueError, match="stores its scales in its own format .* set learn_scale: false"):
        Recipe.from_dict({"passes": [{"adaround": {"scheme": SCHEMES["nvfp4"][0], "learn_scale": True}}]}).build()
    with pytest.raises(ValueError, match="actorder none or static"):
        Recipe.from_dict({"passes": [{"gptq": {"scheme": SCHEMES["mxfp4"][0], "actorder": "group"}}]}).build()
    ragged = tiny_llama(inter=80)  # down_proj's 80 columns are 2.5 MXFP4 groups
    compress(ragged, Recipe.from_dict({"passes": [{"rtn": {"scheme": SCHEMES["mxfp4"][0]}}]}), quiet=True)
    with pytest.raises(ValueError, match="no ragged last group"):
        save_compressed(ragged, tmp_path / "r")


def test_loader_refuses_float_tensors_that_do_not_match_the_config(tmp_path):
    from safetensors.torch import save_file

    model, recipe = _model("nvfp4")
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight_scale"] = sd["model.layers.0.mlp.up_proj.weight_scale"].float()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj.weight_scale should be torch.float8_e4m3fn"):
        load_compressed(out, verify=False)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nvfp4_fused_siblings_share_one_global_scale(tmp_path, method):
    """vLLM runs q/k/v and gate/up as one fused layer with one global scale (the largest of the shards'), so
    the shards must be exported with the same one."""
    from compressor.core.arch import fused_groups

    assert fused_groups(["a.q_proj", "a.k_proj", "a.v_proj", "a.o_proj", "b.q_proj", "m.gate_proj", "m.up_proj"]) == [
        ["a.q_proj", "a.k_proj", "a.v_proj"], ["a.o_proj"], ["b.q_proj"], ["m.gate_proj", "m.up_proj"]]
    model, recipe = _model("nvfp4", method)
    sd = load_file(save_compressed(model, tmp_path / "e", recipe=recipe) / "model.safetensors")
    for layer in range(2):
        p = f"model.layers.{layer}."
        gs = {n: float(sd[f"{p}{n}.weight_global_scale"]) for n in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
        assert gs["self_attn.q_proj"] == gs["self_attn.k_proj"] == gs["self_attn.v_proj"]
        assert gs["mlp.gate_proj"] == gs["mlp.up_proj"]
        qkv = [model.model.layers[layer].self_attn.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj")]
        assert gs["self_attn.q_proj"] == pytest.approx(448 * 6 / max(float(w.detach().abs().max()) for w in qkv), rel=1e-6)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_a_loaded_float_export_turns_back_into_trainable_linears_and_reexports_identically(tmp_path, name):
    from compressor.algorithms.distill.students import trainable_from_export

    model, recipe = _model(name)
    first = save_compressed(model, tmp_path / "a", recipe=recipe)
    loaded = trainable_from_export(load_compressed(first))
    assert not any(isinstance(m, FloatQuantLinear) for m in loaded.modules())
    assert torch.equal(_logits(loaded), _logits(model))
    second = save_compressed(loaded, tmp_path / "b")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)


def test_vllm_blocker_for_fp8_weights_in_groups():
    from compressor.export.runtimes import vllm_blockers

    fp8 = QuantScheme(type="float", bits=8, group_size=32, symmetric=True)
    qcfg = {"config_groups": {"group_0": {"weights": ct_export.scheme_to_ct_args(fp8), "format": "float-quantized"}}}
    assert any("FP8 weights in groups of 32" in b for b in vllm_blockers(qcfg))
    qcfg["config_groups"]["group_0"]["weights"] = ct_export.scheme_to_ct_args(
        QuantScheme(type="float", bits=8, group_size=-1, symmetric=True))
    assert vllm_blockers(qcfg) == []


@pytest.mark.parametrize("name, method", [("fp8", "rtn"), ("mxfp4", "rtn"), ("nvfp4", "rtn"), ("nvfp4", "gptq")])
def test_float_moe_experts_export_and_reload(name, method, tmp_path):
    """FP8, MXFP4 and NVFP4 experts are stored per expert (as vLLM's fused-MoE loader reads them) and reload as
    FloatQuantLinear children of QuantExperts, with the in-memory logits. NVFP4: each expert's gate and up share
    one global scale (vLLM keeps one per expert for the fused gate / up GEMM), its down has its own."""
    from tests.test_families import IDS, MOE, tiny

    from compressor.runtime.quant_experts import QuantExperts

    model = tiny("qwen3_moe", **MOE)
    scheme = {"fp8": {"type": "float", "bits": 8, "group_size": -1, "symmetric": True},
              "mxfp4": {"type": "float", "bits": 4, "group_size": 32, "symmetric": True, "scale_format": "e8m0"},
              "nvfp4": SCHEMES["nvfp4"][0]}[name]
    recipe = Recipe.from_dict({"passes": [{method: {"scheme": scheme}}]})
    compress(model, recipe, calibration=IDS if method == "gptq" else None, quiet=True)
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    experts = loaded.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and isinstance(experts[0]["down_proj"], FloatQuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS[:2]).logits, ref, rtol=0, atol=1e-6)
    if name == "nvfp4":
        stored = load_file(tmp_path / "e" / "model.safetensors")
        key = "model.layers.0.mlp.experts.{}.{}.weight_global_scale"
        for e in range(2):
            gate, up, down = (stored[key.format(e, p)] for p in ("gate_proj", "up_proj", "down_proj"))
            assert torch.equal(gate, up) and gate.shape == (1,)
            fused = model.model.layers[0].mlp.experts.gate_up_proj[e]
            assert torch.equal(gate, global_scale(fused.float(), QuantScheme(**scheme)).reshape(1))
            assert not torch.equal(gate, down)


BLOCK = {"type": "float", "bits": 8, "group_size": 32, "symmetric": True, "block_rows": 16}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_fp8_block_weights_export_one_scale_per_block_and_reload(tmp_path, method):
    """DeepSeek-style block FP8 (here 16 x 32 on the tiny model): compressed-tensors' block strategy, a
    (ceil(N / 16), K / 32) scale per weight; compressed-tensors' decompressor and our loader reproduce it."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model = tiny_llama(inter=96)
    recipe = Recipe.from_dict({"passes": [{method: {"scheme": BLOCK}}]})
    compress(model, recipe, calibration=X if method == "gptq" else None, quiet=True)
    down = model.model.layers[0].mlp.down_proj  # (64, 96)
    scale = quant_state(down)[1].scale
    assert all(torch.equal(scale[i], scale[16 * (i // 16)]) for i in range(64))  # one scale per block of rows
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert qcfg["format"] == "float-quantized" and weights["strategy"] == "block"
    assert weights["block_structure"] == [16, 32]
    sd = load_file(out / "model.safetensors")
    assert sd["model.layers.0.mlp.down_proj.weight_scale"].shape == (4, 3)
    args = QuantizationArgs(**weights)
    theirs = FloatQuantizationCompressor.decompress(
        ct_export.compress_module_state(down, "float-quantized"), QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(theirs["weight"], down.weight)
    loaded = load_compressed(out)
    assert loaded.model.layers[0].mlp.down_proj.scheme.block_rows == 16
    assert torch.equal(_logits(loaded), ref)


def test_fp8_block_scheme_checks():
    with pytest.raises(ValueError, match="block_rows applies to FP8 weights with float scales"):
        QuantScheme(type="float", bits=4, group_size=16, symmetric=True, scale_format="e4m3", block_rows=16)
    assert QuantScheme(**BLOCK).describe() == "FP8 (E4M3 block 16x32)"
    assert QuantScheme(**BLOCK).bits_per_weight(96) == pytest.approx(8 + 16 / 32 / 16)
    assert "block_rows" not in QuantScheme(bits=4).to_dict()  # recipes without blocks read as before


def test_per_tensor_fp8_has_one_scale_from_the_whole_matrix():
    from compressor.core.scheme import compute_qparams

    tensor = QuantScheme(**SCHEMES["fp8-tensor"][0])
    assert tensor.per_tensor and tensor.describe() == "FP8 (E4M3 per-tensor)" and tensor.bits_per_weight(96) == 8
    assert tensor.scale_rows(64) == 1 and tensor.rows_per_scale(64) == 64
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    w[7, 3] = -30.0
    qp = compute_qparams(w, tensor)
    assert qp.scale.shape == (40, 1) and torch.equal(qp.scale, torch.full((40, 1), 30.0 / 448))
    with pytest.raises(ValueError, match="needs group_size: -1"):
        QuantScheme(type="float", bits=8, group_size=128, symmetric=True, block_rows=-1)
    with pytest.raises(ValueError, match="or -1"):
        QuantScheme(type="float", bits=8, group_size=-1, symmetric=True, block_rows=-2)


@pytest.mark.parametrize("name", ["fp8", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_adaround_on_float_grids_beats_rounding_and_exports(name, granularity, tmp_path):
    """AdaRound chooses, per weight, the grid value below or above W / s on the (non-uniform) float grid; scales
    stay as the format stores them (NVFP4's global scale shared by q/k/v and gate/up)."""
    calib = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(5))
    base = tiny_llama(inter=96)
    with torch.no_grad():
        ref = base(calib).logits

    def error(method, **extra):
        model = tiny_llama(inter=96)
        recipe = Recipe.from_dict({"passes": [{method: {"scheme": SCHEMES[name][0], **extra}}]})
        compress(model, recipe, calibration=calib if method == "adaround" else None, quiet=True)
        with torch.no_grad():
            return (model(calib).logits - ref).pow(2).mean().item(), model, recipe

    ada, model, recipe = error("adaround", iters=150, granularity=granularity)
    rtn, _, _ = error("rtn")
    assert ada < rtn, (ada, rtn)
    if name == "nvfp4":
        attn = model.model.layers[0].self_attn
        scales = {quant_state(getattr(attn, p))[1].global_scale.item() for p in ("q_proj", "k_proj", "v_proj")}
        assert len(scales) == 1
    with torch.no_grad():
        logits = model(calib[:2]).logits
        loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
        assert torch.equal(loaded(calib[:2]).logits, logits)
