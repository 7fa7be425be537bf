"""Recipes: strict configs, YAML round trip, overrides, target matching."""

from __future__ import annotations

import pytest
import yaml
from tests.helpers import tiny_llama

from compressor.passes.rtn import RTNConfig
from compressor.recipe import Recipe, apply_overrides
from compressor.core.passes import config_from_dict, select_modules

BASE = {"seed": 3, "passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 64}, "ignore": ["lm_head"]}}]}


def test_yaml_round_trip(tmp_path):
    recipe = Recipe.from_dict(BASE)
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert Recipe.load(path) == recipe
    name, cfg = recipe.passes[0]
    assert name == "rtn" and cfg.scheme.bits == 4 and cfg.scheme.group_size == 64 and recipe.seed == 3


@pytest.mark.parametrize(
    "data,match",
    [
        ({"passes": [{"rtn": {"schem": {}}}]}, "unknown key 'passes\\[0\\].rtn.schem'.*did you mean 'scheme'"),
        ({"passes": [{"rtn": {"scheme": {"bitz": 4}}}]}, "did you mean 'bits'"),
        ({"passes": [{"rtm": {}}]}, "unknown pass 'rtm'.*Did you mean 'rtn'"),
        ({"passes": [{"rtn": {"scheme": {"bits": 12}}}]}, "bits=12"),
        ({"passes": [{"rtn": {"scheme": {"bits": "4"}}}]}, "expected an integer"),
        ({"passes": [{"rtn": {"scheme": {"symmetric": "yes"}}}]}, "expected true/false"),
        ({"passes": [{"rtn": {"targets": ["re:(unclosed"]}}]}, "bad regular expression"),
        ({"pases": []}, "unknown recipe key"),
        ({"passes": ["rtn"]}, "write each pass as"),
    ],
)
def test_bad_recipes_fail_loudly(data, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict(data)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Recipe.load(bad)
    with pytest.raises(FileNotFoundError):
        Recipe.load(tmp_path / "missing.yaml")


def test_overrides_by_pass_name_and_index():
    data = apply_overrides(BASE, ["rtn.scheme.bits=3", "passes.0.scheme.symmetric=true", "seed=7", "rtn.ignore=[lm_head, re:.*k_proj]"])
    recipe = Recipe.from_dict(data)
    cfg = recipe.passes[0][1]
    assert (cfg.scheme.bits, cfg.scheme.symmetric, recipe.seed) == (3, True, 7)
    assert cfg.ignore == ("lm_head", "re:.*k_proj")
    assert BASE["passes"][0]["rtn"]["scheme"]["bits"] == 4  # input not mutated


def test_an_override_of_one_pass_leaves_a_scheme_shared_by_alias_alone():
    data = yaml.safe_load("""
passes:
  - awq: {scheme: &w4 {bits: 4, group_size: 64}}
  - gptq: {scheme: *w4}
""")
    assert data["passes"][0]["awq"]["scheme"] is data["passes"][1]["gptq"]["scheme"]
    out = apply_overrides(data, ["gptq.scheme.observer=mse"])
    assert out["passes"][1]["gptq"]["scheme"] == {"bits": 4, "group_size": 64, "observer": "mse"}
    assert out["passes"][0]["awq"]["scheme"] == {"bits": 4, "group_size": 64}
    assert "observer" not in data["passes"][1]["gptq"]["scheme"]  # input not mutated


@pytest.mark.parametrize("item,match", [("rtn.scheme.bits", "key=value"), ("gptq.scheme.bits=3", "no single pass named 'gptq'"),
                                        ("passes.4.scheme.bits=3", "has 1 passes")])
def test_bad_overrides(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(BASE, [item])


def test_override_unknown_key_caught_by_validation():
    with pytest.raises(ValueError, match="unknown key"):
        Recipe.from_dict(apply_overrides(BASE, ["rtn.scheme.group=32"]))


def test_target_matching_class_exact_and_regex():
    model = tiny_llama()
    names = lambda **kw: [n for n, _ in select_modules(model, config_from_dict(RTNConfig, kw))]  # noqa: E731
    assert len(names()) == 14  # 7 linears x 2 layers, lm_head ignored
    assert "lm_head" in names(ignore=[])
    assert names(targets=["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert names(targets=["re:.*\\.0\\..*_proj$"], ignore=["re:.*mlp.*"]) == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"
    ]
    assert names(targets=["Module"], ignore=["re:.*"]) == []


def test_recipe_yaml_is_plain():
    text = Recipe.from_dict(BASE).to_yaml()
    assert yaml.safe_load(text)["passes"][0]["rtn"]["scheme"]["group_size"] == 64


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``5e-5`` as a string; recipes and overrides read it as YAML 1.2 does."""
    ost = {"passes": [{"ostquant": {"steps": 1}}]}
    data = apply_overrides(ost, ["ostquant.lr=5e-5", "ostquant.lr_clip=3E-2", "ostquant.lr_scale=1.0e-3"])
    cfg = Recipe.from_dict(data).passes[0][1]
    assert (cfg.lr, cfg.lr_clip, cfg.lr_scale) == (5e-5, 3e-2, 1e-3)
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - ostquant:\n      lr: 2e-4\n      steps: 7\n      seed: 1e3\n")
    with pytest.raises(ValueError, match="seed"):  # 1e3 is a float, not the integer a seed must be
        Recipe.load(path)
    path.write_text("passes:\n  - ostquant:\n      lr: 2e-4\n      steps: 7\n")
    cfg = Recipe.load(path).passes[0][1]
    assert cfg.lr == 2e-4 and cfg.steps == 7
    assert apply_overrides(BASE, ["passes.0.ignore=[1e2, x1e2, 1_0]"])["passes"][0]["rtn"]["ignore"] == [100.0, "x1e2", 10]
