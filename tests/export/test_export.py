"""Export → reload: bit-exact logits, compressed-tensors decompression, transformers loading, safety."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from tests.helpers import tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.export import compressed_tensors as ct_export
from compressor.core.atomic import verify_manifest
from compressor.runtime.quant_linear import QuantLinear
from compressor.kernels.cpu import Int4Weight
from compressor.core.state import quant_state

X = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantized(bits=4, group_size=32, symmetric=False, **kw):
    model = tiny_llama(**kw)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": bits, "group_size": group_size, "symmetric": symmetric}}}]})
    compress(model, recipe, quiet=True)
    return model, recipe


SCHEMES = [(4, 32, False), (4, 32, True), (4, -1, False), (3, 16, True), (2, 32, False), (8, 64, True), (4, 24, False)]


@pytest.mark.parametrize("bits,gs,sym", SCHEMES)
def test_reload_gives_identical_logits(tmp_path, bits, gs, sym):
    model, recipe = _quantized(bits, gs, sym)
    ref = model(X).logits
    out = save_compressed(model, tmp_path / "export", recipe=recipe)
    loaded = load_compressed(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.equal(loaded(X).logits, ref)
    for name, module in model.named_modules():
        if quant_state(module) is not None:
            assert torch.equal(loaded.get_submodule(name).dequantized_weight(), module.weight)


def test_reload_in_bfloat16_runs_the_int4_cpu_path(tmp_path):
    """dtype= casts every floating tensor, so bf16 activations reach the QuantLinears (int4 CPU op at W4)."""
    model, recipe = _quantized(4, 32, False, hidden=64, inter=96)
    ref = model(X).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "export", recipe=recipe), dtype=torch.bfloat16)
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    out = loaded(X).logits
    assert out.dtype == torch.bfloat16
    assert isinstance(loaded.model.layers[0].self_attn.q_proj._kernel_cache["cpu"], Int4Weight)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05  # bf16 end to end


def test_files_config_and_manifest(tmp_path):
    model, recipe = _quantized(4, 32, False)
    out = save_compressed(model, tmp_path / "e", recipe=recipe, info={"seed": 0})
    names = sorted(p.name for p in out.iterdir())
    assert names == ["compressor_manifest.json", "config.json", "generation_config.json", "model.safetensors", "recipe.yaml"]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["quant_method"] == "compressed-tensors"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"]) == (4, 32, "group", False)
    assert cfg["ignore"] == ["lm_head"]
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in sd  # tied to the embeddings, stored once
    assert sd["model.layers.0.mlp.up_proj.weight_packed"].shape == (80, 64 * 4 // 32)
    assert sd["model.layers.0.mlp.up_proj.weight_zero_point"].shape == (80 * 4 // 32, 2)
    assert sd["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 3)  # 80 = 32 + 32 + 16: ragged
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight_shape"], torch.tensor([80, 64]))
    manifest = verify_manifest(out)
    assert manifest["recipe"] == recipe.to_dict() and manifest["seed"] == 0
    assert Recipe.load(out / "recipe.yaml") == recipe


@pytest.mark.parametrize("bits,gs,sym", [s for s in SCHEMES if s[1] == -1 or (80 % s[1] == 0 and 64 % s[1] == 0)])
def test_compressed_tensors_decompresses_to_our_weights(bits, gs, sym):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, _ = _quantized(bits, gs, sym)
    module = model.model.layers[1].mlp.up_proj
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct_export.scheme_to_ct_args(module.quant_scheme)))
    state = ct_export.compress_module_state(module)
    out = PackedQuantizationCompressor.decompress(state, scheme)
    assert torch.equal(out["weight"], module.weight)


def test_compressed_tensors_rejects_ragged_groups_we_load(tmp_path):
    """compressed-tensors 0.20 raises on group sizes that do not divide in_features; our loader handles them."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model, _ = _quantized(4, 24, False)
    module = model.model.layers[0].mlp.down_proj  # K = 80, not a multiple of 24
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct_export.scheme_to_ct_args(module.quant_scheme)))
    with pytest.raises(ValueError, match="divisble|divisible"):
        PackedQuantizationCompressor.decompress(ct_export.compress_module_state(module), scheme)


def test_transformers_loads_symmetric_export(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, recipe = _quantized(4, 16, True)
    ref = model(X).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf(X).logits, ref)


def test_quantized_lm_head_unties_embeddings(tmp_path):
    model = tiny_llama()
    emb = model.model.embed_tokens.weight.detach().clone()
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 32}, "ignore": []}}]})
    compress(model, recipe, quiet=True)
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the embedding itself stays full precision
    ref = model(X).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(load_compressed(out)(X).logits, ref)


def test_off_grid_weight_is_refused(tmp_path):
    model, recipe = _quantized()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="q_proj: weight is not on its quantization grid"):
        save_compressed(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_existing_output_refused_unless_overwrite(tmp_path):
    model, recipe = _quantized()
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_compressed(model, out)
    assert (out / "keep.txt").read_text() == "user data"
    save_compressed(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    model, _ = _quantized()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ct_export, "save_file", boom)
    with pytest.raises(OSError, match="no space left"):
        save_compressed(model, tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_sharded_export_reloads(tmp_path):
    model, recipe = _quantized()
    ref = model(X).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert torch.equal(load_compressed(out)(X).logits, ref)


def test_corrupt_and_truncated_files_are_detected(tmp_path):
    model, recipe = _quantized()
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_compressed(out)
    from compressor.api import check_checkpoint

    with pytest.raises(ValueError, match="truncated"):
        check_checkpoint(out)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load_compressed(out)


def test_float_zero_point_cannot_be_exported(tmp_path):
    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 32, "zero_point": "float"}}}]})
    compress(model, recipe, quiet=True)
    with pytest.raises(ValueError, match="zero_point='int'"):
        save_compressed(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_model_without_quantized_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        save_compressed(tiny_llama(), tmp_path / "e")
