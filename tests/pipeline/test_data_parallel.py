"""Data-parallel calibration on torch.distributed (compressor.core.distributed): two gloo processes, each on
its share of the calibration sequences, compress like one process over all of them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tests.helpers import launch_two_cpu_processes

from compressor import Recipe, load_compressed
from compressor.algorithms.hessian import HessianAccumulator
from compressor.cli import main
from compressor.core import distributed
from compressor.pipeline import schedule
from compressor.pipeline.inputs import SharedInputs, all_reduce_block

X = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(0))  # 5 batches of 24 tokens, K = 40
FP = X + 0.01 * torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(1))


def _accumulate_share(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        acc = HessianAccumulator(40, slab=16)  # slabbed: all_reduce must mirror the upper part first
        for i in range(5)[distributed.share(5)]:  # rank 0: batches 0-2, rank 1: 3-4
            acc.add(X[i], FP[i])
        acc.all_reduce()
        torch.save({"H": acc.H, "C": acc.C, "n": acc.n}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduced_hessians_are_the_one_process_hessians(tmp_path):
    """Each rank's mean over its own tokens, weighted by its share and summed, is the mean over all tokens."""
    mp.spawn(_accumulate_share, args=(str(tmp_path / "store"), str(tmp_path / "acc")), nprocs=2)
    one = HessianAccumulator(40, slab=16)
    for i in range(5):
        one.add(X[i], FP[i])
    got = [torch.load(tmp_path / f"acc.{r}") for r in (0, 1)]
    assert torch.equal(got[0]["H"], got[1]["H"]) and torch.equal(got[0]["C"], got[1]["C"])  # every rank the same
    assert got[0]["n"] == got[1]["n"] == one.n == 120
    torch.testing.assert_close(got[0]["H"], one.H, rtol=1e-5, atol=1e-6)  # float32 summation order only
    torch.testing.assert_close(got[0]["C"], one.C, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, shares", [(5, [range(0, 3), range(3, 5)]), (4, [range(0, 2), range(2, 4)]),
                                       (1, [range(0, 1), range(1, 1)])])
def test_shares_are_contiguous_in_rank_order(monkeypatch, n, shares):
    for rank, want in enumerate(shares):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        assert range(n)[distributed.share(n)] == want


@pytest.mark.parametrize("passes, words", [
    ([{"adaround": {"granularity": "block"}}], "adaround cannot calibrate data-parallel"),
    ([{"awq": {}}, {"gptq": {}}], "awq cannot"),
    ([{"gptq": {}}, {"distill": {"steps": 1}}], "distill cannot"),
])
def test_a_pass_that_cannot_share_its_statistics_is_refused_before_any_work(passes, words):
    with pytest.raises(ValueError, match=words) as err:
        schedule.check_data_parallel(Recipe.from_dict({"passes": passes}).build())
    assert "one process" in str(err.value)
    schedule.check_data_parallel(Recipe.from_dict({"passes": [{"gptq": {}}, {"rtn": {"targets": ["lm_head"]}}]}).build())


class _Counted:
    """An accumulator that counts its all-reduces."""

    def __init__(self):
        self.reduced = 0

    def all_reduce(self):
        self.reduced += 1


@pytest.mark.parametrize("pass_name", ["gptq", "prune"])
def test_a_block_with_moe_experts_is_refused_data_parallel_and_nothing_is_reduced(pass_name):
    """The ranks route different tokens to different experts: the block stops, naming the pass, before any sum."""
    inputs = SharedInputs()
    shared = _Counted()
    inputs.stats = {"q_proj": shared, "k_proj": shared, "o_proj": _Counted()}
    with pytest.raises(ValueError, match=f"^{pass_name}: data-parallel calibration of MoE experts .* one process"):
        all_reduce_block(pass_name, inputs, {"mlp.experts": torch.nn.Module()})
    assert shared.reduced == 0
    all_reduce_block(pass_name, inputs, {})
    assert shared.reduced == 1 and inputs.stats["o_proj"].reduced == 1  # a shared accumulator once


def _recipe_args(model_dir, tmp_path, passes: list[dict]) -> list[str]:
    """``compressor compress`` arguments for ``passes`` (written as a recipe file), 6 x 32 calibration tokens."""
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"passes": passes}))
    return ["compress", str(model_dir), "--recipe", str(recipe), "--calibration", str(tmp_path / "text.txt"),
            "--num-samples", "6", "--seq-len", "32", "-q"]


def _one_and_two(args: list[str], tmp_path) -> None:
    """Run ``compressor args`` in one process into ``tmp_path/one`` and in two gloo processes into ``tmp_path/two``."""
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    proc = launch_two_cpu_processes([*args, "-o", str(tmp_path / "two")], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("stream", [False, True])
def test_two_gloo_processes_compress_like_one(tiny_model_dir, tmp_path, stream):
    """`accelerate launch` with two CPU processes: each calibrates on half the sequences, the Hessians are
    summed over both, rank 0 writes. Against one process on all the sequences: the same tensors up to
    float32 summation order in the Hessians (a rare rounding decision may flip), the same outputs.
    Streamed (``--stream``), every rank reads each block from the checkpoint and frees it; only rank 0
    stages and writes shards."""
    args = ["compress", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "--method", "gptq",
            "--calibration", str(tmp_path / "text.txt"), "--num-samples", "6", "--seq-len", "32", "-q",
            *(["--stream"] if stream else [])]
    _one_and_two(args, tmp_path)
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    packed = [k for k in one if k.endswith("weight_packed")]
    assert packed
    same = sum(int(torch.equal(one[k], two[k])) for k in packed)
    assert same >= len(packed) - 1, f"only {same} of {len(packed)} packed weights identical"
    for k in one:
        if k.endswith("weight_scale"):
            torch.testing.assert_close(one[k].float(), two[k].float(), rtol=1e-2, atol=0)
    manifest = json.loads((tmp_path / "two" / "compressor_manifest.json").read_text())
    info = manifest.get("info", {})
    assert manifest.get("processes", info.get("processes")) == 2
    assert manifest.get("streamed", info.get("streamed", False)) is stream
    assert not [p.name for p in tmp_path.iterdir() if ".stream-" in p.name]  # no rank left a staging directory
    ids = torch.randint(0, 95, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = load_compressed(tmp_path / "one")(ids).logits, load_compressed(tmp_path / "two")(ids).logits
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()


@pytest.mark.parametrize("asymmetric", [False, True])
def test_two_gloo_processes_adaround_like_one(tiny_model_dir, tmp_path, asymmetric):
    """AdaRound, layer granularity (asymmetric: the full-precision stream's inputs too): every layer's recorded
    inputs are gathered from both ranks in rank order, so each rank samples the rows one process samples and
    learns the same rounding; the exports agree but for float32 round-off in the block forwards."""
    args = _recipe_args(tiny_model_dir, tmp_path, [{"adaround": {"scheme": {"bits": 4, "group_size": 32}, "iters": 20,
                                                                 "asymmetric": asymmetric}}])
    _one_and_two(args, tmp_path)
    one, two = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    packed = [k for k in one if k.endswith("weight_packed")]
    assert len(packed) == 14
    codes = torch.cat([one[k].flatten() for k in packed]), torch.cat([two[k].flatten() for k in packed])
    assert (codes[0] == codes[1]).float().mean() >= 0.99  # packed words: a word differs if any of its codes does
    ids = torch.randint(0, 95, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = load_compressed(tmp_path / "one")(ids).logits, load_compressed(tmp_path / "two")(ids).logits
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()


def _norms_share(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from compressor.algorithms.prune.scores import InputNormAccumulator

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        acc = InputNormAccumulator(40)
        for i in range(5)[distributed.share(5)]:
            acc.add(X[i])
        acc.all_reduce()
        torch.save({"sq": acc.sq, "n": acc.n}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduced_input_norms_are_the_one_process_norms(tmp_path):
    """Wanda's (and the OWL / DP sweep's) per-feature input norms: the token-weighted mean over the ranks."""
    from compressor.algorithms.prune.scores import InputNormAccumulator

    mp.spawn(_norms_share, args=(str(tmp_path / "store"), str(tmp_path / "acc")), nprocs=2)
    one = InputNormAccumulator(40)
    for i in range(5):
        one.add(X[i])
    got = [torch.load(tmp_path / f"acc.{r}") for r in (0, 1)]
    assert torch.equal(got[0]["sq"], got[1]["sq"]) and got[0]["n"] == got[1]["n"] == one.n == 120
    torch.testing.assert_close(got[0]["sq"], one.sq, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prune", [
    {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1},
    {"method": "sparsegpt", "sparsity": 0.5},
    {"method": "wanda", "structure": "2:4"},
    {"method": "wanda", "sparsity": 0.5, "allocation": "dp", "dp_probe": 4},  # the "output" probe, 2 sequences a rank
])
def test_two_gloo_processes_prune_like_one(tiny_model_dir, tmp_path, prune):
    """prune (Wanda with OWL or DP allocation, SparseGPT, N:M) + GPTQ in two processes: the input norms /
    Hessians, the OWL sweep's norms and DP's probe KL are summed over the ranks, so each linear keeps the same weights as in one
    process but for rare float32-order flips, and the outputs agree."""
    args = _recipe_args(tiny_model_dir, tmp_path, [{"prune": prune}, {"gptq": {"scheme": {"bits": 4, "group_size": 32}}}])
    _one_and_two(args, tmp_path)
    one, two = (load_compressed(tmp_path / d) for d in ("one", "two"))
    weights = {n: m.dequantized_weight() for n, m in one.named_modules() if n.endswith("proj")}
    other = dict(two.named_modules())
    assert len(weights) == 14
    agree = total = 0
    for name, w in weights.items():
        v = other[name].dequantized_weight()
        # the same plan (kept counts); a kept weight GPTQ rounds to 0 may differ by a rounding decision
        assert abs(int((w == 0).sum()) - int((v == 0).sum())) <= 0.005 * w.numel(), name
        agree += int(((w == 0) == (v == 0)).sum())
        total += w.numel()
    assert agree >= 0.995 * total, f"masks agree on {agree / total:.4f} of the weights"
    ids = torch.randint(0, 95, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = one(ids).logits, two(ids).logits
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
