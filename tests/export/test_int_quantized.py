"""W8A8 exports in compressed-tensors' ``int-quantized`` layout (what vLLM's int8 W8A8 path reads): files, config,
bit-exact reload, compressed-tensors' own decompressor, transformers, mixed formats, the vLLM verdicts."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.helpers import tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.export import compressed_tensors as ct_export
from compressor.export.runtimes import (
    AMX_16BIT,
    AMX_ONLY,
    AVX512_ONLY,
    WITH_VNNI,
    YES,
    loaders,
    vllm_blockers,
    vllm_cpu,
)
from compressor.export.summary import summarize
from compressor.runtime.activations import INPUT_CHILD
from compressor.runtime.quant_linear import QuantLinear

X = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _w8a8(symmetric=True, group_size=-1, act_symmetric=True, extra=()):
    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [
        {"rtn": {"scheme": {"bits": 8, "group_size": group_size, "symmetric": symmetric}}},
        {"quantize_activations": {"bits": 8, "symmetric": act_symmetric}}, *extra]})
    compress(model, recipe, quiet=True)
    return model, recipe


def _logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("sym,act_sym", [(True, True), (True, False), (False, True)])
def test_w8a8_is_int_quantized_and_reloads_bit_exactly(tmp_path, sym, act_sym):
    model, recipe = _w8a8(sym, act_symmetric=act_sym)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "int-quantized" and qcfg["config_groups"]["group_0"]["format"] == "int-quantized"
    sd = load_file(out / "model.safetensors")
    w = sd["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.int8 and w.shape == (80, 64)
    assert "model.layers.0.mlp.up_proj.weight_packed" not in sd and "model.layers.0.mlp.up_proj.weight_shape" not in sd
    zp = sd.get("model.layers.0.mlp.up_proj.weight_zero_point")
    assert (zp is None) == sym and (sym or (zp.dtype == torch.int8 and zp.shape == (80, 1)))
    loaded = load_compressed(out)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(_logits(loaded), ref)


def test_compressed_tensors_decompresses_int_quantized_to_our_weights():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, _ = _w8a8()
    module = model.model.layers[1].mlp.down_proj
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct_export.scheme_to_ct_args(module.quant_scheme)),
                                input_activations=QuantizationArgs(num_bits=8, strategy="token", dynamic=True))
    state = ct_export.compress_module_state(module, ct_export.INT_FORMAT)
    out = IntQuantizationCompressor.decompress(state, scheme)
    assert torch.equal(out["weight"].to(module.weight.dtype), module.weight)


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_loads_w8a8_export(tmp_path, sym):
    """transformers + compressed-tensors load int-quantized W8A8 and quantize the inputs per token, with their own
    scale: absmax / 127.5 (compressed-tensors' ``calculate_qparams``) where vLLM and we use absmax / 127. So the
    logits are close, not equal; without the input quantizers they equal ours. Asymmetric weights load too: the
    zero points are stored unpacked."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, recipe = _w8a8(sym)
    ref = _logits(model)
    hf = AutoModelForCausalLM.from_pretrained(save_compressed(model, tmp_path / "e", recipe=recipe))
    got = _logits(hf)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
    for m in list(model.modules()) + list(hf.modules()):
        if INPUT_CHILD in m._modules:
            m._modules[INPUT_CHILD] = torch.nn.Identity()
        if getattr(m, "quantization_scheme", None) is not None:
            m.quantization_scheme.input_activations = None
    assert torch.equal(_logits(hf), _logits(model))


def test_mixed_formats_say_mixed_precision_and_reload(tmp_path):
    """W8A8 on the MLP, W4A16 on attention: two groups, two formats, "mixed-precision" at the top."""
    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [
        {"rtn": {"scheme": {"bits": 8, "group_size": -1}, "targets": ["re:.*mlp.*"]}},
        {"rtn": {"scheme": {"bits": 4, "group_size": 32}, "targets": ["re:.*self_attn.*"]}},
        {"quantize_activations": {"bits": 8, "targets": ["re:.*mlp.*"]}}]})
    compress(model, recipe, quiet=True)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "mixed-precision"
    assert sorted(g["format"] for g in qcfg["config_groups"].values()) == ["int-quantized", "pack-quantized"]
    assert torch.equal(_logits(load_compressed(out)), ref)
    info = summarize(out)
    assert info["quantized_layers"] == 14
    assert 4 < info["bits_per_weight"] < 9


def test_wrong_codes_in_an_int_quantized_group_are_refused(tmp_path):
    model, recipe = _w8a8()
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].float()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.weight should hold int8 \(N, K\) codes.*is torch.float32"):
        load_compressed(out, verify=False)


def test_summary_counts_int8_codes(tmp_path):
    model, recipe = _w8a8()
    info = summarize(save_compressed(model, tmp_path / "e", recipe=recipe))
    assert info["quantized_layers"] == 14
    assert 8 < info["bits_per_weight"] < 9  # int8 codes + one fp32 scale per row of 64 or 80
    assert any(r.startswith("vLLM (CPU: yes, exact with VNNI") for r in info["loaders"])


def test_vllm_cannot_serve_asymmetric_w8a8_weights_and_says_so_at_export(tmp_path, caplog):
    model, recipe = _w8a8(symmetric=False)
    with caplog.at_level(logging.WARNING, logger="compressor.export.compressed_tensors"):
        out = save_compressed(model, tmp_path / "e", recipe=recipe)
    (line,) = [r.getMessage() for r in caplog.records if "vLLM cannot serve" in r.getMessage()]
    assert "symmetric per-channel weights" in line
    assert line.endswith("it loads with compressor.load_compressed, transformers + compressed-tensors")
    assert any(r.startswith("not vLLM") for r in summarize(out)["loaders"])


def test_vllm_verdicts_follow_its_scheme_rules():
    def cfg(bits, act=None, sym=True, strategy="channel", fmt="pack-quantized", kv=None):
        w = {"num_bits": bits, "symmetric": sym, "strategy": strategy, "group_size": None if strategy == "channel" else 64}
        a = None if act is None else {"num_bits": act, "symmetric": True, "strategy": "token", "dynamic": True}
        return {"quant_method": "compressed-tensors", "format": fmt, "kv_cache_scheme": kv,
                "config_groups": {"group_0": {"weights": w, "input_activations": a, "format": fmt}}}

    assert vllm_cpu(cfg(8, 8, fmt="int-quantized")) == WITH_VNNI
    seven = {**cfg(8, 8, fmt="int-quantized"), "compressor": {"weights": {"group_0": {"num_bits": 7}}}}
    assert vllm_cpu(seven) == YES
    assert vllm_cpu(cfg(4, strategy="group")) == AVX512_ONLY
    assert vllm_cpu(cfg(8)) == "no" and vllm_cpu(cfg(3, strategy="group")) == "no"
    assert vllm_cpu(cfg(4, 8)) == "no" and vllm_blockers(cfg(4, 8)) == []  # W4A8: GPU kernels only
    assert vllm_blockers(cfg(8, 8, strategy="group", fmt="int-quantized"))
    kv4 = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "dynamic": True}
    assert "KV cache" in vllm_blockers(cfg(4, 4, kv=kv4))[0]
    assert loaders({}, {})[-1] == "vLLM"
    # symmetric int8 inputs: the user-facing verdict says AMX CPUs need 16-bit compute (measured, module docstring)
    shapes = {"model.layers.0.mlp.up_proj": (64, 64)}
    assert loaders(seven, shapes)[-1] == f"vLLM (CPU: yes; {AMX_16BIT}; CUDA: by format, untested)"
    assert AMX_16BIT not in loaders(cfg(4, strategy="group"), shapes)[-1]


def test_vllm_cpu_verdicts_for_float_weights():
    """FP8 W8A8 per channel / tensor runs through torch._scaled_mm on every x86 build; FP8 blocks only on AMX;
    FP8 weight-only, NVFP4 and MXFP4 have no CPU kernel in vLLM 0.32."""
    def cfg(bits, strategy="channel", act=True, group=None):
        w = {"num_bits": bits, "type": "float", "symmetric": True, "strategy": strategy, "group_size": group}
        a = {"num_bits": bits, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True} if act else None
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"weights": w, "input_activations": a, "format": "float-quantized"}}}

    assert vllm_cpu(cfg(8)) == YES and vllm_cpu(cfg(8, "tensor")) == YES
    assert vllm_cpu(cfg(8, "block")) == AMX_ONLY
    assert vllm_cpu(cfg(8, act=False)) == "no"
    assert vllm_cpu(cfg(4, "tensor_group", group=16)) == "no"  # NVFP4 W4A4


def test_w7a8_is_stored_as_8_bit_codes_and_reloads_as_7_bit(tmp_path):
    """7-bit codes go out as an 8-bit int-quantized group (vLLM's W8A8 path wants 8), the true width in our
    extension; the reload has the 7-bit scheme and the same logits."""
    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 7, "group_size": -1, "symmetric": True}}},
                                          {"quantize_activations": {"bits": 8}}]})
    compress(model, recipe, quiet=True)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "int-quantized" and qcfg["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    assert qcfg["compressor"]["weights"] == {"group_0": {"num_bits": 7}}
    codes = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert codes.dtype == torch.int8 and int(codes.min()) >= -64 and int(codes.max()) <= 63
    loaded = load_compressed(out)
    assert loaded.model.layers[0].mlp.up_proj.scheme.bits == 7
    assert torch.equal(_logits(loaded), ref)
    assert vllm_cpu(qcfg) == YES
