"""Offload through accelerate: a model squeezed by max_memory onto CPU and disk scores exactly like the loaded one."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.cli import main
from compressor.eval.perplexity import perplexity
from compressor.export.placement import parse_max_memory, place_model, placement_summary
from compressor.export.checkpoint import load_for_eval
from compressor.eval.suite import SuiteConfig


@pytest.fixture
def export_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "w4g32"
    assert main(["compress", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "-o", str(out), "-q"]) == 0
    return out


def _ids():
    return torch.randint(0, 95, (200,), generator=torch.Generator().manual_seed(0))  # (T,)


def _offloaded_params(model) -> int:
    return sum(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("which,budget", [("checkpoint", "150KB"), ("export", "60KB")])
def test_offloaded_model_has_the_same_perplexity(tiny_model_dir, export_dir, tmp_path, which, budget):
    path = tiny_model_dir if which == "checkpoint" else export_dir
    full = perplexity(load_for_eval(path), _ids(), ctx=32, quiet=True)
    model = load_for_eval(path, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}  # some modules stay in memory, the rest really went to disk
    assert _offloaded_params(model) > 0 and placement_summary(model).startswith("cpu:")
    assert any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())
    res = perplexity(model, _ids(), ctx=32, quiet=True)
    assert res.tokens == full.tokens and res.ppl == pytest.approx(full.ppl, rel=1e-6)


def test_cli_offload_flags(tiny_model_dir, export_dir, tmp_path):
    text, offload = str(tmp_path / "text.txt"), tmp_path / "offload"
    common = ["--dataset", text, "--ctx", "64", "--decode-tokens", "2", "--prompt-tokens", "8", "-q"]
    assert main(["eval", str(tiny_model_dir), str(export_dir), *common, "--json", str(tmp_path / "plain.json")]) == 0
    assert main(["eval", str(tiny_model_dir), str(export_dir), *common, "--json", str(tmp_path / "off.json"),
                 "--device-map", "auto", "--max-memory", "cpu=60KB", "--offload-folder", str(offload)]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())["rows"]
    off = json.loads((tmp_path / "off.json").read_text())
    assert off["settings"]["max_memory"] == {"cpu": "60KB"}
    assert [r["placement"] for r in plain] == ["cpu", "cpu"]
    assert [r["placement"] for r in off["rows"]] == ["disk:1", "cpu:2 disk:3"]  # all on disk; embeddings kept
    for p, o in zip(plain, off["rows"]):
        assert o["ppl"] == pytest.approx(p["ppl"], rel=1e-6)
        assert o["kl_to_base"] == pytest.approx(p["kl_to_base"], abs=1e-9)
        assert o["decode_tok_s"] > 0
    assert list(offload.iterdir()) == []  # each model's offload subfolder is removed with the model


def test_placement_errors(tiny_model_dir, tmp_path, caplog):
    assert parse_max_memory("cpu=200MB, 0=10GiB") == {"cpu": "200MB", 0: "10GiB"}
    assert parse_max_memory("cpu=4096") == {"cpu": 4096}
    for bad, match in [("cpu", "no size"), ("gpu=1GB", "unknown"), ("cpu=lots", "not a size"), (",", "empty")]:
        with pytest.raises(ValueError, match=match):
            parse_max_memory(bad)
    with pytest.raises(ValueError, match="--device-map auto"):
        SuiteConfig(max_memory="cpu=1MB")
    with pytest.raises(ValueError, match="--offload-folder"):
        place_model(load_for_eval(tiny_model_dir), "auto", max_memory={"cpu": "60KB"})
    assert main(["eval", str(tiny_model_dir), "--dataset", str(tmp_path / "text.txt"), "--offload-folder",
                 str(tmp_path / "o"), "-q"]) == 2
    assert "--device-map auto" in caplog.text
