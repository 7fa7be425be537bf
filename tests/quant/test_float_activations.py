"""FP8, MXFP4 and NVFP4 activations: exact against compressed-tensors' own fake quantization, exported and reloaded."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.core.fake_quant import activation_global_scale, activation_static_scale, fake_quant_float_per_token
from compressor.export.online_write import input_activation_args
from compressor.runtime.activations import ActivationQuantizer

WEIGHTS = {
    "fp8": {"type": "float", "bits": 8, "group_size": -1, "symmetric": True},
    "fp8-static": {"type": "float", "bits": 8, "group_size": -1, "symmetric": True, "block_rows": -1},
    "mxfp4": {"type": "float", "bits": 4, "group_size": 32, "scale_format": "e8m0", "symmetric": True},
    "nvfp4": {"type": "float", "bits": 4, "group_size": 16, "scale_format": "e4m3", "symmetric": True},
}
BITS = {"fp8": 8, "fp8-block": 8, "fp8-static": 8, "mxfp4": 4, "nvfp4": 4}
IDS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _inputs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 256, generator=g) * torch.rand(1, 1, 256, generator=g) * 4  # channels of different range
    x[0, 0, 3] = 40.0  # an outlier
    x[1, 2] = 0.0  # an all-zero token
    return x


@pytest.mark.parametrize("fmt", ["fp8", "fp8-block", "fp8-static", "mxfp4", "nvfp4"])
def test_matches_compressed_tensors_fake_quantization(fmt):
    """compressed-tensors' forward_quantize on the input_activations we export gives the very same values."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_config import QuantizationStatus

    x = _inputs()
    gs = activation_global_scale(x.abs().max()) if fmt == "nvfp4" else None
    args = QuantizationArgs(**input_activation_args(BITS[fmt], True, fmt))
    holder = nn.Module()
    holder.quantization_status = QuantizationStatus.FROZEN
    if gs is not None:
        holder.input_global_scale = gs
    static = None
    if fmt == "fp8-static":  # a scale from a smaller calibration maximum: the outlier 40 saturates at 448 x scale
        static = activation_static_scale(20.0)
        holder.input_scale = static
    theirs = forward_quantize(holder, x, "input", args)
    ours = fake_quant_float_per_token(x, fmt, gs, static)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, x) and torch.equal(ours[1, 2], x[1, 2])  # quantized; a zero token stays zero


def test_quantizer_refuses_mismatched_settings():
    with pytest.raises(ValueError, match="nvfp4 activations are 4-bit, symmetric and unclipped"):
        ActivationQuantizer(8, fmt="nvfp4")
    with pytest.raises(ValueError, match="nvfp4 activations need a global scale"):
        ActivationQuantizer(4, fmt="nvfp4")
    with pytest.raises(ValueError, match="format='nvfp5'.*use one of"):
        Recipe.from_dict({"passes": [{"quantize_activations": {"format": "nvfp5", "bits": 4}}]})
    with pytest.raises(ValueError, match="is a 4-bit symmetric grid without clipping: set bits: 4"):
        Recipe.from_dict({"passes": [{"quantize_activations": {"format": "mxfp4"}}]})


@pytest.mark.parametrize("fmt", ["fp8", "fp8-static", "mxfp4", "nvfp4"])
def test_w_a_float_exports_and_reloads(fmt, tmp_path):
    """Weights and inputs in the format; nvfp4's input global scales come from the calibration inputs' maxima."""
    model = tiny_llama(hidden=64, inter=96)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": WEIGHTS[fmt]}},
                                          {"quantize_activations": {"format": fmt, "bits": BITS[fmt]}}]})
    seen = {}
    q_proj = model.model.layers[1].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("max", max(seen.get("max", 0.0),
                                                                                         float(a[0].abs().max()))))
    compress(model, recipe, calibration=IDS, quiet=True)
    handle.remove()
    quantizer = q_proj.input_quantizer
    assert quantizer.fmt == fmt
    if fmt == "nvfp4":  # calibrated on the inputs the quantized block 0 produces: the maximum seen, as observed here
        torch.testing.assert_close(quantizer.global_scale, activation_global_scale(seen["max"]), rtol=1e-6, atol=0)
    if fmt == "fp8-static":  # one scale per layer: the largest calibration input / 448
        torch.testing.assert_close(quantizer.input_scale, activation_static_scale(seen["max"]), rtol=1e-6, atol=0)
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["input_activations"]["type"] == "float"
    if fmt == "fp8-static":  # compressed-tensors' FP8 preset: static per-tensor inputs, a (1,) input_scale per layer
        acts = qcfg["config_groups"]["group_0"]["input_activations"]
        assert acts["strategy"] == "tensor" and acts["dynamic"] is False
        from safetensors.torch import load_file

        stored = load_file(out / "model.safetensors")["model.layers.1.self_attn.q_proj.input_scale"]
        assert stored.shape == (1,) and torch.equal(stored, quantizer.input_scale)
    loaded = load_compressed(out)
    assert loaded.model.layers[1].self_attn.q_proj.input_quantizer.fmt == fmt
    with torch.no_grad():
        assert torch.equal(loaded(IDS[:2]).logits, ref)


def test_nvfp4_activations_need_calibration_and_divisible_widths():
    with pytest.raises(ValueError, match=r"\['quantize_activations'\] need calibration data"):
        compress(tiny_llama(hidden=64, inter=96),
                 Recipe.from_dict({"passes": [{"quantize_activations": {"format": "nvfp4", "bits": 4}}]}), quiet=True)
    with pytest.raises(ValueError, match="down_proj: mxfp4 activations come in groups of 32, which do not divide "
                                         "this input's 80 features"):
        compress(tiny_llama(hidden=64, inter=80),
                 Recipe.from_dict({"passes": [{"quantize_activations": {"format": "mxfp4", "bits": 4}}]}), quiet=True)


def test_cli_presets_quantize_weights_and_inputs(tmp_path, tiny_model_dir, caplog):
    from compressor.cli import main

    text = tiny_model_dir.parent / "text.txt"
    for preset, fmt in (("fp8", "float-quantized"), ("fp8-static", "float-quantized"), ("nvfp4", "nvfp4-pack-quantized")):
        out = tmp_path / preset
        assert main(["compress", str(tiny_model_dir), "--scheme", preset, "--calibration", str(text),
                     "--num-samples", "4", "--seq-len", "16", "-o", str(out), "-q"]) == 0
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qcfg["format"] == fmt and qcfg["config_groups"]["group_0"]["input_activations"]["type"] == "float"
        assert load_compressed(out).model.layers[0].mlp.up_proj.input_quantizer.fmt == preset
    # the tiny model's down_proj reads 80 features: not whole MXFP4 groups of 32
    assert main(["compress", str(tiny_model_dir), "--scheme", "mxfp4", "-o", str(tmp_path / "x"), "-q"]) != 0
    assert "groups of 32" in caplog.text and not (tmp_path / "x").exists()


def test_fp8_block_preset_exports_and_reloads(tmp_path):
    """--scheme fp8-block: 128 x 128 FP8 weight blocks and FP8 inputs per token and 128 features (FP8_BLOCK)."""
    from compressor.cli import _recipe, build_parser

    args = build_parser().parse_args(["compress", "m", "--scheme", "fp8-block", "-o", str(tmp_path / "x")])
    recipe = _recipe(args)
    model = tiny_llama(hidden=128, inter=256)
    compress(model, recipe, quiet=True)
    assert model.model.layers[0].mlp.up_proj.input_quantizer.fmt == "fp8-block"
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["block_structure"] == [128, 128]
    assert group["input_activations"]["strategy"] == "group" and group["input_activations"]["group_size"] == 128
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(IDS[:2]).logits, ref)


@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
def test_fp8_kv_cache_calibrates_static_scales_exports_and_reloads(per_head, tmp_path):
    """kv_format fp8: keys and values on E4M3 with static scales max|k| / 448 from the calibration data, exported as
    compressed-tensors' FP8 kv_cache_scheme with k_scale / v_scale per attention module (what vLLM reads)."""
    from compressed_tensors.quantization import QuantizationArgs
    from safetensors.torch import load_file

    from compressor.core import floats

    model = tiny_llama(hidden=64, inter=96)
    with torch.no_grad():
        dense = model(IDS[:2]).logits
    recipe = Recipe.from_dict({"passes": [
        {"rtn": {"scheme": WEIGHTS["fp8"]}},
        {"quantize_activations": {"format": "fp8", "bits": 8, "kv_bits": 8, "kv_symmetric": True,
                                  "kv_format": "fp8", "kv_per_head": per_head}}]})
    compress(model, recipe, calibration=IDS, quiet=True)
    kv = model.model.layers[0].self_attn.kv_quantizer
    assert not kv.observing and kv.k_scale.shape == ((2,) if per_head else (1,)) and bool((kv.k_scale > 0).all())
    keys = torch.randn(1, 2, 5, 16) * 0.3
    out, _ = kv(keys, keys)
    scale = kv.k_scale.reshape(1, -1, 1, 1)
    assert torch.equal(out, floats.round_to_grid(floats.E4M3, keys / scale) * scale)
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    assert not torch.equal(ref, dense)
    out_dir = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qcfg["kv_cache_scheme"])
    assert args.type == "float" and args.num_bits == 8 and args.dynamic is False
    assert args.strategy == ("attn_head" if per_head else "tensor")
    sd = load_file(out_dir / "model.safetensors")
    assert sd["model.layers.1.self_attn.v_scale"].shape == ((2, 1, 1) if per_head else (1,))
    with torch.no_grad():
        assert torch.equal(load_compressed(out_dir)(IDS[:2]).logits, ref)
