"""benchmarks/recipes_cli.py: a recipe through the CLI's compress and eval, compared with the benchmark's record."""

from __future__ import annotations

import pytest

from benchmarks import recipes_cli
from benchmarks.report import RECIPES


def test_a_recipe_runs_through_the_cli_and_is_compared(tiny_model_dir, tmp_path, monkeypatch):
    text = str(tiny_model_dir.parent / "text.txt")
    calls = []
    monkeypatch.setattr(recipes_cli, "benchmark_ppl", lambda setting: calls.append(setting) or {"ppl": 1e9, "machine": {}})
    record = recipes_cli.run_one(RECIPES / "w4pc.yaml", tiny_model_dir, tmp_path, 256, dataset=text, ctx=64,
                                 calibration=("--calibration", text, "--num-samples", "4", "--seq-len", "16"))
    assert record["status"] == "ok", record.get("error")
    assert calls == ["w4pc"] and record["benchmark_ppl"] == 1e9 and record["reproduced"] is False
    assert 1 < record["ppl"] < 1e6 and record["compress_s"] > 0 and record["eval_s"] > 0
    compress, evaluate = record["commands"]
    assert compress.startswith("compressor compress SMOLLM2 --recipe recipes/w4pc.yaml") and " -o OUT " in compress
    assert evaluate.startswith("compressor eval SMOLLM2 OUT --dataset") and "--json ROWS" in evaluate


def test_a_failing_command_is_recorded_with_its_error(tiny_model_dir, tmp_path):
    record = recipes_cli.run_one(RECIPES / "w4g128.yaml", tiny_model_dir, tmp_path, 256,  # 64 wide: no group of 128
                                 calibration=("--calibration", str(tiny_model_dir.parent / "text.txt"),
                                              "--num-samples", "4", "--seq-len", "16"))
    assert record["status"] == "failed" and record["error"].startswith("compress exited")


def test_reproduced_means_round_off_on_the_same_machine_and_a_tie_across_machines():
    here = {"cpu": "Xeon", "isa": "AVX512"}
    run = {"ppl": 25.19, "machine": here}
    same = recipes_cli.compare(run, {"ppl": 25.1, "machine": here, "commit": "abcdef123"})
    assert same["same_machine"] and same["reproduced"] is False and same["benchmark_commit"] == "abcdef12"
    assert recipes_cli.compare(run, {"ppl": 25.19, "machine": here})["reproduced"] is True
    other = recipes_cli.compare(run, {"ppl": 25.156, "machine": {"cpu": "AMD EPYC", "isa": None}})
    assert not other["same_machine"] and other["reproduced"] is True and other["rel_diff"] == 0.001352
    assert recipes_cli.compare(run, {"ppl": 24.0, "machine": {"cpu": "AMD EPYC"}})["reproduced"] is False
    assert recipes_cli.compare(run, None) == {**run, "benchmark_ppl": None, "reproduced": None}


def test_unknown_recipes_are_refused():
    with pytest.raises(SystemExit):
        recipes_cli.main(["--recipes", "w9g1"])
