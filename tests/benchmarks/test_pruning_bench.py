"""benchmarks/pruning.py planning: every allocation name builds a valid prune recipe, N:M stays uniform."""

from __future__ import annotations

from conftest import load_benchmark

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
