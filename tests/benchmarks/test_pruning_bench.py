"""benchmarks/pruning.py planning: every allocation name builds a valid prune recipe, N:M stays uniform."""

from __future__ import annotations

from tests.helpers import load_benchmark

from compressor import Recipe


def test_every_allocation_builds_a_valid_recipe():
    bench = load_benchmark("pruning")
    jobs = bench.plan_jobs(["wanda"], ["0.7", "2:4"], list(bench.ALLOCATIONS), {"n_calib": 4})
    assert [j["allocation"] for j in jobs if j["sparsity"] == "0.7"] == list(bench.ALLOCATIONS)
    assert [j["allocation"] for j in jobs if j["sparsity"] == "2:4"] == ["uniform"]
    for job in jobs:
        (p,) = Recipe.from_dict(bench.recipe_for(job)).build()
        if job["allocation"].startswith("dp-"):
            want = {"dp-output": "output", "dp-linear": "relative"}[job["allocation"]]
            assert (p.config.allocation, p.config.dp_distortion) == ("dp", want)
        elif job["sparsity"] == "0.7":
            assert p.config.allocation == job["allocation"]


def test_batch_size_reaches_every_job(monkeypatch):
    bench = load_benchmark("pruning")
    seen = []
    monkeypatch.setattr(bench, "run_job", lambda job, *_a: seen.append(job) or {"status": "ok"})
    monkeypatch.setattr(bench.common, "emit", lambda *_a: None)
    bench.main(["--methods", "wanda,llmc-wanda,magnitude", "--sparsities", "0.5", "--batch-size", "1", "--quick",
                "--true-sequential"])
    assert [(j["method"], j["batch_size"]) for j in seen] == [("wanda", 1), ("llmc-wanda", 1), ("magnitude", 1)]
    (wanda,) = Recipe.from_dict(bench.recipe_for(seen[0])).build()
    (magnitude,) = Recipe.from_dict(bench.recipe_for(seen[2])).build()
    assert wanda.config.true_sequential and not magnitude.config.true_sequential


def test_records_say_which_split_scored_them():
    """A dev-split run (for choosing hyper-parameters) must be told apart from a reported test-split one."""
    bench = load_benchmark("pruning")
    protocol = {"quick": False, "n_calib": 128, "calib_len": 512, "max_tokens": 32768, "threads": None, "split": "dev"}
    (job,) = bench.plan_jobs(["wanda"], ["0.7"], ["dp-output"], protocol)
    assert bench.record_for(job)["protocol"]["split"] == "dev"
    assert bench.record_for({"method": "fp32"})["protocol"]["split"] == "test"
