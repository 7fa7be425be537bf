"""Pruning fused MoE experts: every expert's gate, up and down pruned as its own matrix from its own tokens."""

from __future__ import annotations

import pytest
import torch
from tests.test_families import IDS, MOE, tiny

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.prune.masks import select_mask
from compressor.algorithms.prune.scores import magnitude_scores, wanda_scores
from compressor.core.coverage import coverage
from compressor.core.sparsity import MASK_SUFFIX, expert_mask

CALIB = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))


def _model():
    return tiny("qwen3_moe", **MOE)


def _prune(model, **prune):
    recipe = Recipe.from_dict({"passes": [{"prune": prune}]})
    compress(model, recipe, calibration=IDS, quiet=True)
    return recipe


def _splits(param: torch.Tensor, pname: str):
    """Each expert's per-linear matrices of a fused parameter: gate and up of gate_up_proj, down of down_proj."""
    n = 2 if pname == "gate_up_proj" else 1
    rows = param.shape[1] // n
    return [(e, param[e, j * rows:(j + 1) * rows]) for e in range(param.shape[0]) for j in range(n)]


@pytest.mark.parametrize("prune", [{"method": "wanda", "structure": "2:4"}, {"method": "sparsegpt", "sparsity": 0.5},
                                   {"method": "magnitude", "sparsity": 0.5}, {"method": "sparsegpt", "structure": "2:4"}],
                         ids=["wanda-2:4", "sparsegpt-50%", "magnitude-50%", "sparsegpt-2:4"])
def test_every_expert_is_pruned_to_its_structure(prune):
    model = _model()
    recipe = _prune(model, **prune)
    cov = coverage(model, recipe.build())
    assert cov["kinds"]["experts"]["compressed"] == cov["kinds"]["experts"]["total"] > 0
    assert cov["compressed"] == cov["targeted"]
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for pname in ("gate_up_proj", "down_proj"):
            param = getattr(experts, pname)
            mask = experts._buffers[pname + MASK_SUFFIX]
            assert torch.equal(param == 0, ~mask | (param == 0)) and not param[~mask].any()  # pruned = exact zeros
            for _, w in _splits(param, pname):
                k = w.shape[1]
                if prune.get("structure") == "2:4":  # at least 2 zeros in every 4 consecutive inputs of every row
                    assert ((w.reshape(w.shape[0], k // 4, 4) == 0).sum(-1) >= 2).all()
                else:  # each projection its own comparison group: exactly half of it pruned (layer or row scope)
                    assert (w == 0).sum().item() >= w.numel() // 2
                    assert (w == 0).float().mean().item() < 0.5 + 0.05


def test_wanda_scores_each_expert_by_the_tokens_routed_to_it():
    """Block 0 sees the embedding output, so its statistics can be recomputed here: each expert's mask is Wanda's
    on the tokens the router sends it (gate/up) and on its own activations (down)."""
    model = _model()
    captured = {}
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda _m, args: captured.setdefault("in", args))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    x, index = captured["in"][0], captured["in"][1]
    x, index = x.reshape(-1, x.shape[-1]), index.reshape(x.reshape(-1, x.shape[-1]).shape[0], -1)
    weights = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    _prune(model, method="wanda", sparsity=0.5)
    for e in range(MOE["num_experts"]):
        tokens = x[(index == e).any(-1)]
        gate, up = (tokens @ weights["gate_up_proj"][e].T).chunk(2, dim=-1)
        inputs = {"gate_up_proj": tokens, "down_proj": experts.act_fn(gate) * up}
        for pname, inp in inputs.items():
            norms = inp.pow(2).sum(0).sqrt()
            for j, (_, w) in enumerate(_splits(weights[pname][e:e + 1], pname)):
                want = select_mask(wanda_scores(w, norms), 0.5, "row")
                rows = slice(j * w.shape[0], (j + 1) * w.shape[0])
                assert torch.equal(expert_mask(experts, pname, e)[rows], want), (pname, e, j)
        # and it is not simply magnitude: the routed tokens changed the choice somewhere
    w = weights["down_proj"][0]
    assert not torch.equal(expert_mask(experts, "down_proj", 0), select_mask(magnitude_scores(w), 0.5, "row"))


def test_sparsegpt_on_experts_beats_magnitude():
    """SparseGPT's per-expert Hessians lower the output error against magnitude pruning at 50% (attention kept
    dense, so the experts' error is all there is). Measured on this tiny random model: 4.62e-6 against 5.88e-6
    on the calibration tokens, 5.00e-6 against 5.36e-6 on held-out ones (random weights and isotropic inputs
    leave little for any method to find; Wanda ties with magnitude here)."""
    base = _model()
    with torch.no_grad():
        ref, ref_calib = base(HELD_OUT).logits, base(CALIB).logits

    def error(method):
        model = _model()
        recipe = Recipe.from_dict({"passes": [{"prune": {"method": method, "sparsity": 0.5, "targets": ["Experts"],
                                                        "ignore": ["lm_head", "re:.*self_attn"]}}]})
        compress(model, recipe, calibration=CALIB, quiet=True)
        with torch.no_grad():
            return ((model(HELD_OUT).logits - ref).pow(2).mean().item(),
                    (model(CALIB).logits - ref_calib).pow(2).mean().item())

    (sparsegpt, sparsegpt_calib), (magnitude, magnitude_calib) = error("sparsegpt"), error("magnitude")
    assert sparsegpt_calib < 0.85 * magnitude_calib and sparsegpt < magnitude, (sparsegpt, magnitude)


def test_quantizing_pruned_experts_keeps_their_zeros_and_reloads(tmp_path):
    model = _model()
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "wanda", "structure": "2:4"}},
                                          {"gptq": {"scheme": {"bits": 4, "group_size": 32}}}]})
    compress(model, recipe, calibration=IDS, quiet=True)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for pname in ("gate_up_proj", "down_proj"):
            assert not getattr(experts, pname)[~experts._buffers[pname + MASK_SUFFIX]].any()
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "e", recipe=recipe))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS[:2]).logits, ref, rtol=0, atol=1e-6)


def test_rtn_after_pruning_keeps_expert_zeros():
    model = _model()
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "magnitude", "sparsity": 0.6}},
                                          {"rtn": {"scheme": {"bits": 3, "group_size": 32}}}]})
    compress(model, recipe, quiet=True)
    experts = model.model.layers[1].mlp.experts
    assert not experts.down_proj[~experts._buffers["down_proj" + MASK_SUFFIX]].any()


def test_expert_masks_survive_a_block_checkpoint(tmp_path):
    from compressor.pipeline.checkpoint import BlockCheckpoint

    model = _model()
    _prune(model, method="wanda", sparsity=0.5)
    block = model.model.layers[0]
    ckpt = BlockCheckpoint(tmp_path, {"run": 1})
    ckpt.save(0, block)
    fresh = _model().model.layers[0]
    ckpt.load(0, fresh)
    for pname in ("gate_up_proj", "down_proj"):
        assert torch.equal(fresh.mlp.experts._buffers[pname + MASK_SUFFIX], block.mlp.experts._buffers[pname + MASK_SUFFIX])
    assert fresh.mlp.experts.sparsity_info == block.mlp.experts.sparsity_info


def test_starved_experts_fall_back_to_magnitude_with_a_count(caplog):
    with caplog.at_level("WARNING", logger="compressor.passes.prune"):
        _prune(_model(), method="wanda", sparsity=0.5, min_expert_tokens=10_000)
    counts = [r.getMessage() for r in caplog.records if "min_expert_tokens" in r.getMessage()]
    assert len(counts) == 2 and all("4 of 4 experts" in m and "by magnitude" in m for m in counts), counts
    caplog.clear()
    with caplog.at_level("WARNING", logger="compressor.passes.prune"):
        _prune(_model(), method="wanda", sparsity=0.5, min_expert_tokens=10_000, moe_calibration="all_experts")
    assert not [r for r in caplog.records if "min_expert_tokens" in r.getMessage()]


def test_allocations_over_experts_and_bad_options_are_refused():
    model = _model()
    before = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    with pytest.raises(ValueError, match=r"allocation='lamp' does not allocate over fused MoE experts yet .*"
                                         r"add 're:model\\\.layers\\\.\\d\+\\\.mlp\\\.experts\$' to ignore"):
        _prune(model, method="magnitude", sparsity=0.5, allocation="lamp")
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, before)
    with pytest.raises(ValueError, match="use 'routed' or 'all_experts'"):
        Recipe.from_dict({"passes": [{"prune": {"sparsity": 0.5, "moe_calibration": "some"}}]})
