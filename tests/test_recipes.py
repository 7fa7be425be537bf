"""recipes/: each file is the benchmark's recipe for its setting, and runs through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmarks import _common as common
from benchmarks import quant_quality
from benchmarks.report import recipe_method
from compressor import Recipe, load_compressed
from tests.helpers import tiny_llama

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_headline_setting():
    assert {p.stem for p in RECIPES} >= {"w4g64", "w4g128", "w4pc", "w3g64", "w4a4-nvfp4", "w4a4-mxfp4"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_each_recipe_is_what_the_benchmark_measured(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert data == quant_quality.recipe_data(recipe_method(path.stem), common.parse_setting(path.stem))
    Recipe.from_dict(data).build()  # every key is a real option


def _compress_with_the_cli(name, model_dir, tmp_path):
    """``compressor compress`` of the tiny model with ``recipes/<name>.yaml`` on a small calibration; the export."""
    from compressor.cli import main

    out = tmp_path / name
    assert main(["compress", str(model_dir), "--recipe", str(RECIPES[[p.stem for p in RECIPES].index(name)]),
                 "--calibration", str(model_dir.parent / "text.txt"), "--num-samples", "4", "--seq-len", "16",
                 "-o", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("name", ["w4g64", "w3g64", "w4pc"])  # the tiny model is 64 wide: no group of 128
def test_recipes_run_through_the_cli(name, tiny_model_dir, tmp_path):
    out = _compress_with_the_cli(name, tiny_model_dir, tmp_path)
    layer = load_compressed(out).model.layers[0].mlp.down_proj
    assert layer.scheme.bits == int(name[1]) and not layer.scheme.symmetric


@pytest.mark.parametrize("name,group", [("w4a4-nvfp4", 16), ("w4a4-mxfp4", 32)])
def test_float_input_recipes_run_through_the_cli(name, group, tiny_model_dir, tmp_path):
    """The W4A4 recipes export float weights with their input quantizers (and MXFP4's block rotations), and
    load_compressed reattaches them (the reload's logits: tests/quant/test_float_activations.py,
    tests/transforms/test_hadamard_inputs.py)."""
    tiny_llama(inter=96).save_pretrained(tiny_model_dir)  # every width a multiple of MXFP4's block of 32
    out = _compress_with_the_cli(name, tiny_model_dir, tmp_path)
    fmt = name.split("-")[1]
    model = load_compressed(out).model
    for layer in (model.layers[0].mlp.down_proj, model.layers[1].self_attn.q_proj):
        assert (layer.scheme.type, layer.scheme.bits, layer.scheme.group_size) == ("float", 4, group)
        assert layer.input_quantizer.fmt == fmt
        assert ("input_transform" in layer._modules) == (fmt == "mxfp4")
