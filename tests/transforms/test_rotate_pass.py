"""The ``rotate`` recipe pass: config validation, ordering, compress with rtn / gptq, export."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.pipeline.sequential import PipelineConfig
from compressor.runtime.online import online_transforms
from compressor.passes.rotate import RotateConfig

IDS = torch.randint(0, 96, (10, 24), generator=torch.Generator().manual_seed(0))
X = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
RTN4 = {"rtn": {"scheme": {"bits": 4, "group_size": -1}}}


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _rel_err(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def test_config_validation_and_round_trip():
    recipe = Recipe.from_dict({"passes": [{"rotate": {"seed": 3, "r4": False}}, RTN4]})
    name, cfg = recipe.passes[0]
    assert name == "rotate" and cfg == RotateConfig(seed=3, r4=False)
    assert recipe.to_dict()["passes"][0] == {"rotate": {"seed": 3, "r1": "hadamard", "r2": True, "r3": False, "r4": False,
                                                    "online_o": False, "r1_at": "auto"}}
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown key 'passes\\[0\\].rotate.sed'.*did you mean 'seed'"):
        Recipe.from_dict({"passes": [{"rotate": {"sed": 0}}]})
    with pytest.raises(ValueError, match="unknown key 'passes\\[0\\].rotate.targets'"):
        Recipe.from_dict({"passes": [{"rotate": {"targets": ["Linear"]}}]})
    with pytest.raises(ValueError, match="use 'hadamard' or 'random'"):
        RotateConfig(r1="cayley")
    with pytest.raises(ValueError, match="non-negative integer"):
        RotateConfig(seed=-1)
    with pytest.raises(ValueError, match="true or false"):
        RotateConfig(r2=1)
    with pytest.raises(ValueError, match="use 'auto', 'residual' or 'inputs'"):
        RotateConfig(r1_at="stream")


def test_rotate_then_rtn_through_compress():
    model, plain = tiny_llama(hidden=48, inter=96), tiny_llama(hidden=48, inter=96)
    ref = _logits(model)
    compress(model, Recipe.from_dict({"passes": [{"rotate": {"seed": 0}}, RTN4]}), quiet=True)
    compress(plain, Recipe.from_dict({"passes": [RTN4]}), quiet=True)
    out = _logits(model)
    assert torch.isfinite(out).all()
    assert model.rotation_info["online"] == 2 and len(online_transforms(model)) == 2
    assert _rel_err(out, ref) < 0.1
    assert _rel_err(_logits(plain), ref) < 0.1


def test_rotate_before_gptq_runs_once_before_the_block_pipeline():
    model = tiny_llama(hidden=48, inter=96, layers=2)
    ref = _logits(model)
    recipe = Recipe.from_dict({"passes": [{"rotate": {}}, {"gptq": {"scheme": {"bits": 4, "group_size": 16}}}]})
    compress(model, recipe, calibration=IDS, pipeline=PipelineConfig(batch_size=5, quiet=True))
    out = _logits(model)
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 0.1
    assert len(online_transforms(model)) == 2
    assert getattr(model.lm_head, "quant_scheme", None) is None


def test_rotate_after_quantization_is_refused():
    recipe = Recipe.from_dict({"passes": [RTN4, {"rotate": {}}]})
    with pytest.raises(ValueError, match="rotate transforms the whole model and must come before rtn"):
        compress(tiny_llama(), recipe, quiet=True)


def test_online_rotation_exports_and_reloads(tmp_path):
    """R4 goes into transform_config (group R4) with its matrix; the reload rotates again: same logits."""
    recipe = Recipe.from_dict({"passes": [{"rotate": {}}, RTN4]})
    model = compress(tiny_llama(), recipe, output=tmp_path / "e", quiet=True)
    loaded = load_compressed(tmp_path / "e")
    assert "input_transform" in loaded.model.layers[0].mlp.down_proj._modules
    assert torch.equal(_logits(loaded), _logits(model))


def test_fused_rotations_export_and_reload(tmp_path):
    """Without R4 a rotated model is plain weights: the export reloads to the same logits."""
    model = tiny_llama(tie=True)
    recipe = Recipe.from_dict({"passes": [{"rotate": {"r4": False}}, RTN4]})
    compress(model, recipe, quiet=True)
    ref = _logits(model)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    assert torch.equal(_logits(load_compressed(out)), ref)
