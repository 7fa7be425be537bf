"""hadamard_inputs: block-diagonal online Hadamards on the linear inputs (MR-GPTQ's block rotations)."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.core.hadamard import normalized_hadamard
from compressor.export.online_read import StoredHadamard
from compressor.runtime.online import OnlineHadamard

IDS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
MXFP4 = {"type": "float", "bits": 4, "group_size": 32, "scale_format": "e8m0", "symmetric": True}
NVFP4 = {"type": "float", "bits": 4, "group_size": 16, "scale_format": "e4m3", "symmetric": True}


@pytest.mark.parametrize("size,block", [(96, 32), (96, 12), (64, 16), (40, 40)])
def test_block_transform_is_the_block_diagonal_hadamard(size, block):
    t = OnlineHadamard(size, block=block)
    blocks = [normalized_hadamard(block).T] * (size // block)  # forward(x) = x H_bᵀ / √b on each block
    q = torch.block_diag(*blocks)
    x = torch.randn(3, 5, size, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ q, rtol=0, atol=1e-12)
    torch.testing.assert_close(t.matrix(), q, rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ q.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    assert t.block == (None if block == size else block) and t.width == block


def test_block_must_tile_the_width():
    with pytest.raises(ValueError, match="does not tile width 80"):
        OnlineHadamard(80, block=32)


def test_pass_keeps_the_function_and_rotates_every_linear_but_the_head():
    model = tiny_llama(hidden=64, inter=96)
    with torch.no_grad():
        ref = model(IDS).logits
    compress(model, Recipe.from_dict({"passes": [{"hadamard_inputs": {"block": 32}}]}), quiet=True)
    rotated = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "input_transform")]
    assert len(rotated) == 2 * 7 and not hasattr(model.lm_head, "input_transform")
    assert all(model.get_submodule(n).input_transform.block == 32 for n in rotated)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_pass_refuses_widths_the_block_does_not_divide_and_a_second_rotation():
    model = tiny_llama(hidden=64, inter=80)  # 80 inputs of down_proj: not a multiple of 32
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    with pytest.raises(ValueError, match=r"down_proj has 80 inputs, not a multiple of block=32: add it to the pass's "
                                         "ignore"):
        compress(model, Recipe.from_dict({"passes": [{"hadamard_inputs": {"block": 32}}]}), quiet=True)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)  # checked before any weight changed
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "input_transform")
    model = tiny_llama(hidden=64, inter=96)
    compress(model, Recipe.from_dict({"passes": [{"rotate": {}}]}), quiet=True)  # R4 on down_proj
    with pytest.raises(ValueError, match="down_proj already rotates its input online"):
        compress(model, Recipe.from_dict({"passes": [{"hadamard_inputs": {"block": 32}}]}), quiet=True)
    with pytest.raises(ValueError, match="hadamard_inputs.block=1"):
        Recipe.from_dict({"passes": [{"hadamard_inputs": {"block": 1}}]}).build()


def test_streamed_run_refuses_a_linear_rotate_already_rotates_as_in_memory(tmp_path):
    from tests.helpers import tiny_tokenizer

    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    recipe = Recipe.from_dict({"passes": [{"rotate": {}}, {"hadamard_inputs": {"block": 16}},
                                          {"rtn": {"scheme": {"bits": 4, "group_size": 16}}}]})
    with pytest.raises(ValueError, match="down_proj already rotates its input online"):  # R4, not dropped
        compress(src, recipe, calibration=IDS, output=tmp_path / "out", quiet=True, stream=True)


@pytest.mark.parametrize("fmt,weights,block", [("mxfp4", MXFP4, 32), ("nvfp4", NVFP4, 16)])
def test_fp4_with_block_rotations_exports_and_reloads(fmt, weights, block, tmp_path):
    model = tiny_llama(hidden=64, inter=96)
    recipe = Recipe.from_dict({"passes": [{"hadamard_inputs": {"block": block}},
                                          {"gptq": {"scheme": weights}},
                                          {"quantize_activations": {"format": fmt, "bits": 4}}]})
    compress(model, recipe, calibration=IDS, quiet=True)
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qcfg["transform_config"]["config_groups"][f"RB{block}"]
    assert group["head_dim"] == block and group["type"] == "hadamard"
    assert [a["location"] for a in group["apply"]] == ["input", "weight_input"]
    assert len(group["apply"][0]["targets"]) == 14
    from safetensors.torch import load_file

    stored = [k for k in load_file(out / "model.safetensors") if f".RB{block}_input." in k]
    assert len(stored) == 1  # one (b, b) matrix shared by the group
    loaded = load_compressed(out)
    t = loaded.model.layers[1].mlp.down_proj.input_transform
    assert isinstance(t, OnlineHadamard) and t.block == block and t.size == 96
    with torch.no_grad():
        assert torch.equal(loaded(IDS[:2]).logits, ref)


def test_stored_block_weight_applies_block_by_block():
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # a (2, 2) transform weight applied on blocks of 2 of 6 inputs
    t = StoredHadamard(w, 6)
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ t.matrix(), rtol=0, atol=1e-12)
    torch.testing.assert_close(t.matrix(), torch.block_diag(*[w.double() / 2 ** 0.5] * 3))
