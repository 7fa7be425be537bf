"""Allocation of sparsity across layers: budgets met, orders right, DP exact against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from compressor.algorithms.prune.allocation import (
    achieved_sparsity,
    global_magnitude,
    lamp,
    lamp_scores,
    outlier_ratio,
    owl,
    rate_distortion,
    uniform,
)


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    # three layers of different sizes and scales: the small-scale one should be pruned hardest by magnitude
    return [torch.randn(8, 16, generator=g) * 0.5, torch.randn(16, 16, generator=g), torch.randn(4, 32, generator=g) * 2]


def test_uniform():
    assert uniform([10, 20], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="fraction"):
        uniform([10], 1.0)


def test_global_magnitude_meets_budget_and_prunes_small_scale_layers_most():
    ws = _layers()
    sizes = [w.numel() for w in ws]
    s = global_magnitude(ws, 0.5)
    assert achieved_sparsity(sizes, s) == pytest.approx(int(0.5 * sum(sizes)) / sum(sizes))
    assert s[0] > s[1] > s[2]


def test_lamp_scores_match_the_definition():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.1]])
    got = lamp_scores(w)
    sq = (w.reshape(-1) ** 2).tolist()
    want = [x / sum(y for y in sq if y >= x) for x in sq]
    torch.testing.assert_close(got.reshape(-1), torch.tensor(want))
    assert got.max() == 1.0  # the largest weight of a layer


def test_lamp_meets_budget_and_never_empties_a_layer():
    ws = _layers(1)
    sizes = [w.numel() for w in ws]
    s = lamp(ws, 0.9)
    assert achieved_sparsity(sizes, s) == pytest.approx(int(0.9 * sum(sizes)) / sum(sizes))
    assert all(x < 1 for x in s)
    # LAMP is scale-invariant per layer: rescaling one layer does not move the allocation
    assert lamp([ws[0] * 100, ws[1], ws[2]], 0.9) == s


def test_outlier_ratio():
    scores = [torch.ones(10, 10), torch.ones(10, 10)]
    scores[1][0, 0] = 1000.0
    assert outlier_ratio(scores, threshold=5) == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="positive"):
        outlier_ratio(scores, threshold=0)


def test_owl_keeps_the_mean_and_protects_outlier_blocks():
    ratios = [0.01, 0.05, 0.03, 0.02]
    s = owl(ratios, 0.7, lam=0.08)
    assert sum(s) / len(s) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s.index(min(s)) == 1 and s.index(max(s)) == 0  # most outliers: pruned least
    assert owl([0.02, 0.02], 0.5) == [0.5, 0.5]


def test_rate_distortion_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    grid = [0.0, 0.25, 0.5, 0.75]
    sizes = [40, 80, 120, 160]
    # convex, increasing curves with layer-dependent sensitivity
    sens = torch.rand(4, generator=g) * 5 + 0.1
    dist = sens[:, None] * torch.tensor(grid)[None, :] ** 2 * torch.rand(4, 1, generator=g)
    target = 0.5
    got = rate_distortion(dist, grid, sizes, target, resolution=400)  # every removal is a whole unit here
    best_cost = float("inf")
    for picks in itertools.product(range(len(grid)), repeat=len(sizes)):
        removed = sum(grid[c] * n for c, n in zip(picks, sizes))
        if removed + 1e-9 >= target * sum(sizes):
            cost = sum(float(dist[l, c]) for l, c in enumerate(picks))
            best_cost = min(best_cost, cost)
    got_cost = sum(float(dist[l, grid.index(s)]) for l, s in enumerate(got))
    assert got_cost == pytest.approx(best_cost)
    assert achieved_sparsity(sizes, got) >= target


def test_rate_distortion_default_resolution_meets_budget():
    grid = [i / 20 for i in range(19)]
    sizes = [1000 + 37 * i for i in range(30)]
    dist = torch.tensor([[(1 + i % 3) * s**2 for s in grid] for i in range(30)])
    s = rate_distortion(dist, grid, sizes, 0.7)
    assert 0.7 <= achieved_sparsity(sizes, s) < 0.71
    # the least sensitive layers (i % 3 == 0) are pruned at least as hard as the most sensitive ones
    assert min(s[0::3]) >= max(s[2::3])


def test_rate_distortion_errors():
    with pytest.raises(ValueError, match="grid tops out"):
        rate_distortion(torch.zeros(1, 2), [0.0, 0.5], [10], 0.7)
    with pytest.raises(ValueError, match="shape"):
        rate_distortion(torch.zeros(2, 2), [0.0, 0.5], [10], 0.5)
    with pytest.raises(ValueError, match="finite"):
        rate_distortion(torch.tensor([[0.0, float("nan")]]), [0.0, 0.5], [10], 0.5)


# ---------------------------------------------------------------- through the prune pass

from tests.helpers import tiny_llama  # noqa: E402
from torch import nn  # noqa: E402

from compressor import Recipe, compress  # noqa: E402
from compressor.core.arch import find_blocks  # noqa: E402
from compressor.pipeline.sequential import PipelineConfig  # noqa: E402
from compressor.pipeline.schedule import sweeper  # noqa: E402

IDS = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
QUIET = PipelineConfig(batch_size=4, quiet=True)


def _block_linears(model):
    name, blocks = find_blocks(model)
    return [(f"{name}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]


def _zeros(model):
    linears = _block_linears(model)
    sizes = [m.weight.numel() for _, m in linears]
    return [float((m.weight == 0).float().mean()) for _, m in linears], sizes


@pytest.mark.parametrize("method,allocation", [("wanda", "owl"), ("sparsegpt", "dp"), ("magnitude", "lamp"),
                                               ("wanda", "global"), ("magnitude", "dp")])
def test_pass_allocation_keeps_the_budget_and_varies_by_layer(method, allocation):
    model = tiny_llama(layers=4)
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": method, "sparsity": 0.6, "allocation": allocation,
                                                     "owl_threshold": 3.0, "scope": "layer"}}]})
    compress(model, recipe, calibration=IDS, pipeline=QUIET, quiet=True)
    sparsities, sizes = _zeros(model)
    assert achieved_sparsity(sizes, sparsities) == pytest.approx(0.6, abs=0.01)
    assert max(sparsities) - min(sparsities) > 0.02  # not uniform
    if allocation == "owl":  # one sparsity per block
        per_block = [sparsities[i:i + 7] for i in range(0, len(sparsities), 7)]
        assert all(max(b) - min(b) < 0.01 for b in per_block)


def test_dp_plan_covers_every_block_linear():
    """plan() alone (no pruning yet): a sparsity for each linear, not all equal, dense weights untouched."""
    from compressor.passes.prune import PruneConfig, PrunePass

    model = tiny_llama(layers=4)
    p = PrunePass(PruneConfig(method="wanda", sparsity=0.6, allocation="dp", scope="layer"))
    plan = p.plan(model, IDS, sweeper(model, IDS, QUIET))
    assert set(plan) == {n for n, _ in _block_linears(model)}
    assert all(0 <= s < 1 for s in plan.values())
    assert len(set(plan.values())) > 1
    assert all((m.weight != 0).all() for _, m in _block_linears(model))


def test_allocation_errors():
    with pytest.raises(ValueError, match="allocation='bogus'"):
        Recipe.from_dict({"passes": [{"prune": {"sparsity": 0.5, "allocation": "bogus"}}]}).build()
    with pytest.raises(ValueError, match="N:M fixes"):
        Recipe.from_dict({"passes": [{"prune": {"structure": "2:4", "allocation": "owl"}}]}).build()
    from compressor.passes.prune import PruneConfig, PrunePass

    with pytest.raises(ValueError, match="calibration"):
        PrunePass(PruneConfig(method="wanda", sparsity=0.5, allocation="owl")).plan(tiny_llama())


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("distortion", ["absolute", "relative"])
def test_dp_curve_is_the_pruned_output_energy(scope, distortion):
    """The cumulative-sum curve equals sum(w^2 ||x||^2) over the weights select_mask prunes, at every grid point."""
    from compressor.algorithms.prune.masks import select_mask
    from compressor.passes.prune import PruneConfig, _AllocationSweep
    from compressor.algorithms.prune.scores import wanda_scores

    g = torch.Generator().manual_seed(3)
    w, norms = torch.randn(12, 40, generator=g), torch.rand(40, generator=g) + 0.1
    cfg = PruneConfig(method="wanda", sparsity=0.5, allocation="dp", scope=scope, dp_step=0.1, dp_distortion=distortion)
    curve = _AllocationSweep(cfg)._curve(w, norms)
    energy = w**2 * norms[None, :] ** 2
    for s, got in zip(cfg.dp_grid, curve):
        want = float(energy[~select_mask(wanda_scores(w, norms), s, scope)].sum())
        if distortion == "relative":
            want /= float(energy.sum())
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), s


def test_output_distortion_is_the_kl_of_the_whole_pruned_model():
    """Each probe (run from the pruned block on) equals KL(dense || model with that block pruned), run whole."""
    import torch.nn.functional as F

    from compressor.algorithms.prune.masks import select_mask
    from compressor.algorithms.prune.probe import output_distortion

    model = tiny_llama(layers=3)
    name, blocks = find_blocks(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids = IDS[:3]

    def masks(i, s):
        return [(m, select_mask(m.weight.abs(), s, "layer")) for m in blocks[i].modules() if isinstance(m, nn.Linear)]

    grid = [0.0, 0.3, 0.8]
    got = output_distortion(model, ids, grid, masks, batch_size=2, quiet=True)
    assert got.shape == (3, 3) and (got[:, 0] == 0).all()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())  # left dense
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=ids).logits.float(), -1)
        for i in range(3):
            for c, s in enumerate(grid[1:], start=1):
                for m, keep in masks(i, s):
                    m.weight.mul_(keep)
                logq = F.log_softmax(model(input_ids=ids).logits.float(), -1)
                want = float((ref.exp() * (ref - logq)).sum() / ids.numel())
                model.load_state_dict(dense)
                assert got[i, c] == pytest.approx(want, rel=1e-4, abs=1e-7), (i, s)
    assert (got[:, 2] > got[:, 1]).all()  # more pruning, more distortion


def test_dp_output_plan_is_one_sparsity_per_block_within_the_span():
    from compressor.passes.prune import PruneConfig, PrunePass

    model = tiny_llama(layers=4)
    p = PrunePass(PruneConfig(method="wanda", sparsity=0.6, allocation="dp", dp_distortion="output", dp_probe=2,
                              dp_span=0.2, dp_step=0.1))
    plan = p.plan(model, IDS, sweeper(model, IDS, QUIET))
    assert set(plan) == {n for n, _ in _block_linears(model)}
    per_block = {}
    for n, s in plan.items():
        per_block.setdefault(n.split(".")[2], set()).add(s)
    assert all(len(v) == 1 for v in per_block.values()) and len(per_block) == 4
    assert all(0.4 - 1e-9 <= s <= 0.8 + 1e-9 for s in plan.values())
    sizes = {n: m.weight.numel() for n, m in _block_linears(model)}
    assert achieved_sparsity(list(sizes.values()), [plan[n] for n in sizes]) >= 0.6 - 1e-9
    assert all((m.weight != 0).all() for _, m in _block_linears(model))
