"""Mixed precision (the allocate_bits pass): exact knapsack, the probe is the whole model's KL, the budget holds,
fused units share a grid, the quantization passes apply the plan, and the export reloads it exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.allocate import choose
from compressor.core.arch import fused_groups
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant
from compressor.core.state import ALLOCATED_BITS, quant_state
from compressor.export.summary import summarize
from compressor.passes.allocate_bits import (
    AllocateBitsConfig,
    AllocateBitsPass,
    _knapsack,
    candidate_name,
    parse_candidate,
)
from compressor.runtime.quant_linear import QuantLinear
from tests.helpers import tiny_llama

IDS = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
CANDIDATES = ["w2g32", "w4g32", "w8pc"]


def _bits_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``(bits, group_size)`` of every quantized linear: in memory (``quant_scheme``) or reloaded (``QuantLinear``)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[n] = (m.scheme.bits, m.scheme.group_size)
        elif isinstance(m, nn.Linear) and hasattr(m, "quant_scheme"):
            out[n] = (quant_state(m)[0].bits, quant_state(m)[0].group_size)
    return out


def test_candidates_parse_and_name():
    assert parse_candidate("w3g64") == (3, 64) and parse_candidate("W4PC") == (4, -1)
    assert candidate_name(3, 64) == "w3g64" and candidate_name(8, -1) == "w8pc"
    for bad in ("w9g64", "w4g0", "4g64", "w4"):
        with pytest.raises(ValueError, match="w<bits>g<group>"):
            parse_candidate(bad)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "target_bpw"),
    ({"target_bpw": 0.5}, "target_bpw"),
    ({"target_bpw": 3.5, "candidates": ()}, "empty"),
    ({"target_bpw": 3.5, "candidates": ("w4g64", "W4G64")}, "repeat"),
    ({"target_bpw": 3.5, "scheme": QuantScheme(bits=4, group_size=16, type="float", symmetric=True,
                                               scale_format="e4m3")}, "integer"),
])
def test_config_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AllocateBitsConfig(**kwargs)


def test_knapsack_is_exact_against_brute_force():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        units, cands = 4, 3
        dist = torch.rand(units, cands, generator=g, dtype=torch.float64)
        bits = torch.randint(50, 400, (units, cands), generator=g).double()
        if trial % 4 == 0:
            bits[0, 1] = dist[0, 1] = math.inf  # a candidate that does not apply to this unit
        lo = float(torch.where(torch.isinf(bits), math.inf, bits).min(1).values.sum())
        hi = float(torch.where(torch.isinf(bits), -math.inf, bits).max(1).values.sum())
        budget = lo + (hi - lo) * float(torch.rand(1, generator=g))
        got = _knapsack(dist, bits, budget, resolution=10**6)
        assert sum(float(bits[u, c]) for u, c in enumerate(got)) <= budget + 1e-9
        feasible = [p for p in itertools.product(range(cands), repeat=units)
                    if sum(float(bits[u, c]) for u, c in enumerate(p)) <= budget]
        want = min(sum(float(dist[u, c]) for u, c in enumerate(p)) for p in feasible)
        assert sum(float(dist[u, c]) for u, c in enumerate(got)) == pytest.approx(want, abs=1e-12)


def test_choose_needs_a_reachable_budget():
    with pytest.raises(ValueError, match="budget"):
        choose(torch.zeros(2, 2), torch.tensor([[0, 1], [0, 1]]), 3)
    assert choose(torch.tensor([[1.0, 0.0]]), torch.tensor([[5, 0]]), 0) == [1]  # nothing needed: least distortion


def _plan(model, target, candidates=CANDIDATES, **kw):
    p = AllocateBitsPass(AllocateBitsConfig(target_bpw=target, candidates=tuple(candidates), probe=4, **kw))
    return p, p.plan(model, IDS)


def test_plan_meets_the_budget_with_one_grid_per_fused_unit():
    model = tiny_llama(layers=3)
    p, plan = _plan(model, 4.5)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(plan) == set(linears)
    for unit in fused_groups(list(linears)):
        assert len({plan[n] for n in unit}) == 1, unit  # q/k/v and gate/up share one grid
    total = sum(m.weight.numel() for m in linears.values())
    bits = sum(QuantScheme(bits=b, group_size=g).bits_per_weight(m.in_features) * m.weight.numel()
               for m, (b, g) in ((m, parse_candidate(plan[n])) for n, m in linears.items()))
    assert bits / total <= 4.5 and p.achieved_bpw == pytest.approx(bits / total)
    assert len(set(plan.values())) > 1  # a budget between the candidates mixes them
    assert all(getattr(m, ALLOCATED_BITS) == parse_candidate(plan[n]) for n, m in linears.items())


def test_more_bits_less_distortion_and_the_extremes():
    model = tiny_llama(layers=3)
    totals = []
    for target in (2.8, 4.5, 6.5):
        p, plan = _plan(model, target)
        totals.append(sum(float(p.distortion[u, CANDIDATES.index(plan[unit[0]])]) for u, unit in enumerate(p.units)))
    assert totals[0] > totals[1] > totals[2]
    _, plan = _plan(model, 16)
    assert set(plan.values()) == {"w8pc"}  # budget to spare: the least distortion everywhere
    with pytest.raises(ValueError, match="below the smallest"):
        _plan(model, 2.0)


def test_probe_is_the_kl_of_the_whole_model_with_one_unit_rounded():
    model = tiny_llama(layers=3)
    p, _ = _plan(model, 4.5)
    modules = dict(model.named_modules())
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=IDS[:4]).logits.float(), -1)
        for u in (0, 5, len(p.units) - 1):
            saved = {n: modules[n].weight.data.clone() for n in p.units[u]}
            scheme = QuantScheme(bits=2, group_size=32)
            for n in p.units[u]:
                w = modules[n].weight.data
                modules[n].weight.data = fake_quant(w, compute_qparams(w, scheme), scheme)
            logq = F.log_softmax(model(input_ids=IDS[:4]).logits.float(), -1)
            want = float((ref.exp() * (ref - logq)).sum() / IDS[:4].numel())
            for n, w in saved.items():
                modules[n].weight.data = w
            assert p.distortion[u, 0] == pytest.approx(want, rel=1e-4, abs=1e-8), p.units[u]


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_the_quantization_pass_applies_the_plan_and_the_export_reloads_it(quantizer, tmp_path):
    model = tiny_llama(layers=3)
    recipe = Recipe.from_dict({"passes": [
        {"allocate_bits": {"target_bpw": 4.5, "candidates": CANDIDATES, "probe": 4}},
        {quantizer: {"scheme": {"bits": 4, "group_size": 32}}},
    ]})
    out = compress(model, recipe, calibration=IDS, quiet=True)
    got = _bits_of(out)
    planned = {n: getattr(m, ALLOCATED_BITS) for n, m in out.named_modules() if hasattr(m, ALLOCATED_BITS)}
    assert got == planned and len(set(got.values())) > 1
    export = save_compressed(out, tmp_path / "e", recipe=recipe)
    loaded = load_compressed(export)
    assert _bits_of(loaded) == got
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, out(input_ids=IDS).logits)
    # inspect reads each layer's stored bits from the headers: wider grids store more
    stored = summarize(export)["layer_bits"]
    assert set(stored) == set(got)
    by_grid = {g: [stored[n] for n in got if got[n] == g] for g in set(got.values())}
    order = sorted(by_grid, key=lambda g: QuantScheme(bits=g[0], group_size=g[1]).bits_per_weight(64))
    assert all(max(by_grid[a]) < min(by_grid[b]) for a, b in zip(order, order[1:]))


def test_a_plan_nobody_applies_is_refused():
    recipe = Recipe.from_dict({"passes": [{"allocate_bits": {"target_bpw": 4.5}}]})
    with pytest.raises(ValueError, match="plans for a quantize pass"):
        compress(tiny_llama(), recipe, calibration=IDS, quiet=True)


def test_a_float_quantizer_refuses_the_integer_plan():
    recipe = Recipe.from_dict({"passes": [
        {"allocate_bits": {"target_bpw": 4.5, "candidates": CANDIDATES, "probe": 2}},
        {"rtn": {"scheme": {"bits": 4, "group_size": 16, "type": "float", "symmetric": True,
                            "scale_format": "e4m3"}}},
    ]})
    with pytest.raises(ValueError, match="allocate_bits mixes integer widths"):
        compress(tiny_llama(), recipe, calibration=IDS, quiet=True)


def test_scaled_distortion_is_exact_at_the_reference_and_ranks_like_the_measured_one():
    """``scaled`` (the default) equals ``output`` at its reference candidate (the widest within the budget: here
    w2g32, as w4g32 costs 4.625 bits on these widths) and keeps, per unit, the measured order of the candidates
    (coarser grid, more distortion)."""
    model = tiny_llama(layers=3)
    scaled, _ = _plan(model, 4.5)
    measured, _ = _plan(model, 4.5, distortion="output")
    assert torch.allclose(scaled.distortion[:, 0], measured.distortion[:, 0], rtol=1e-6)  # w2g32: the reference
    for u in range(len(scaled.units)):
        assert torch.equal(scaled.distortion[u].argsort(), measured.distortion[u].argsort())


def test_scaled_reference_is_the_widest_grid_within_the_budget():
    from compressor.passes.allocate_bits import _reference

    per_weight = torch.tensor([[2.3, 3.3, 4.3, 8.0], [2.3, 3.3, 4.3, 8.0], [5.0, 6.0, 7.0, 8.0]])
    bits = per_weight.clone()
    bits[1, 1] = math.inf  # w3 does not apply to unit 1
    assert _reference(bits, per_weight, 3.5).tolist() == [1, 0, 0]  # unit 2: nothing within 3.5, its narrowest
