"""prune_experts: dropping whole routed experts by REAP score or router load."""

from __future__ import annotations

import pytest
import torch
from tests.test_families import IDS, MOE, MOE_FAMILIES, tiny

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.prune.experts import ExpertScoreAccumulator, keep_experts, remove_experts

MOE_DROP = ["qwen3_moe", "mixtral", "olmoe", "glm4_moe", "deepseek_v3"]


def _model(family="qwen3_moe", **extra):
    return tiny(family, **{**MOE, **MOE_FAMILIES.get(family, {}), **extra})


def _experts_inputs(model):
    """Block 0's experts call (x (T, H), index (T, k), weights (T, k)) on IDS: the dense model's, as the pipeline
    sees it for the first block."""
    seen = {}
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.setdefault("args", args))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    return seen["args"]


def _brute_force_scores(experts, x, index, weights):
    """Routed-token counts and REAP scores, token by token."""
    n = experts.gate_up_proj.shape[0]
    counts, reap = torch.zeros(n), torch.zeros(n, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            out = experts.down_proj[e] @ (experts.act_fn(gate) * up)
            counts[e] += 1
            reap[e] += float(weights[t, slot]) * out.double().norm().item()
    return counts, reap / counts.clamp(min=1)


def test_scores_match_a_token_by_token_count():
    model = _model()
    x, index, weights = _experts_inputs(model)
    experts = model.model.layers[0].mlp.experts
    acc = ExpertScoreAccumulator(4)
    with torch.no_grad():
        acc.add(experts, x, index, weights)
    counts, reap = _brute_force_scores(experts.eval(), x.detach(), index, weights.detach())
    assert torch.equal(acc.scores("frequency"), counts.double())
    torch.testing.assert_close(acc.scores("reap"), reap, rtol=1e-6, atol=0)


@pytest.mark.parametrize("score", ["reap", "frequency"])
def test_the_lowest_scored_expert_of_the_first_block_is_dropped(score):
    model = _model()
    x, index, weights = _experts_inputs(model)
    experts = model.model.layers[0].mlp.experts
    before = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    counts, reap = _brute_force_scores(experts, x.detach(), index, weights.detach())
    want_dropped = int(torch.argmin(counts if score == "frequency" else reap.float()))
    recipe = Recipe.from_dict({"passes": [{"prune_experts": {"fraction": 0.25, "score": score}}]})
    compress(model, recipe, calibration=IDS, quiet=True)
    keep = [e for e in range(4) if e != want_dropped]
    assert torch.equal(experts.gate_up_proj, before["gate_up_proj"][keep])
    assert torch.equal(experts.down_proj, before["down_proj"][keep])
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router[keep])
    assert model.config.num_experts == 3 and experts.num_experts == 3 and model.model.layers[0].mlp.gate.num_experts == 3


def test_tokens_not_routed_to_a_dropped_expert_keep_their_output():
    """With top-k weights renormalized (norm_topk_prob), a token whose experts all stay gets exactly the output
    it had; the tokens that went to the dropped expert change."""
    model = _model(norm_topk_prob=True)
    moe = model.model.layers[0].mlp
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, _, chosen = moe.gate(x.reshape(-1, 64))
        ref = moe(x).reshape(-1, 64)
        remove_experts(moe.gate, moe.experts, keep_experts(torch.tensor([1.0, 1.0, 0.0, 1.0]), 1))  # drop expert 2
        out = moe(x).reshape(-1, 64)
    untouched = ~(chosen == 2).any(-1)
    assert 0 < int(untouched.sum()) < 64
    torch.testing.assert_close(out[untouched], ref[untouched], rtol=0, atol=1e-6)
    assert not torch.allclose(out[~untouched], ref[~untouched], atol=1e-4)


@pytest.mark.parametrize("family", MOE_DROP)
def test_dropped_experts_export_and_reload(family, tmp_path):
    """A plain checkpoint with the smaller num_experts, which transformers loads; then quantized with GPTQ in the
    same recipe, the compressed-tensors export reloads too."""
    from transformers import AutoModelForCausalLM

    model = _model(family)
    recipe = Recipe.from_dict({"passes": [{"prune_experts": {"fraction": 0.5}}]})
    compress(model, recipe, calibration=IDS, quiet=True, output=tmp_path / "plain")
    assert all(m.gate_up_proj.shape[0] == 2 for n, m in model.named_modules() if n.endswith("mlp.experts"))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert theirs.config.num_experts == 2
    with torch.no_grad():
        assert torch.equal(theirs(IDS[:2]).logits, model(IDS[:2]).logits)

    model = _model(family)
    recipe = Recipe.from_dict({"passes": [{"prune_experts": {"fraction": 0.5, "score": "frequency"}},
                                          {"gptq": {"scheme": {"bits": 4, "group_size": 32}}}]})
    compress(model, recipe, calibration=IDS, quiet=True)
    loaded = load_compressed(save_compressed(model, tmp_path / "q", recipe=recipe))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS[:2]).logits, model(IDS[:2]).logits, rtol=0, atol=1e-6)


def test_refusals_leave_the_model_intact():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def run(**cfg):
        compress(model, Recipe.from_dict({"passes": [{"prune_experts": cfg}]}), calibration=IDS, quiet=True)

    with pytest.raises(ValueError, match="removes no expert of model.layers.0.mlp.experts's 4: use at least 0.25"):
        run(fraction=0.1)
    with pytest.raises(ValueError, match="would leave 1 experts .* fewer than the 2 each token is routed to"):
        run(fraction=0.75)
    with pytest.raises(ValueError, match="remove targets/ignore"):
        run(fraction=0.25, targets=["Experts"])
    with pytest.raises(ValueError, match="use one of \\('reap', 'frequency'\\)"):
        run(score="load")
    grouped = _model("deepseek_v3", n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="group-limited routing"):
        compress(grouped, Recipe.from_dict({"passes": [{"prune_experts": {"fraction": 0.5}}]}), calibration=IDS,
                 quiet=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.num_experts == 4


def test_keep_experts_breaks_ties_toward_lower_indices():
    assert keep_experts(torch.tensor([1.0, 0.0, 0.0, 2.0]), 1).tolist() == [0, 1, 3]
    assert keep_experts(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0]
    with pytest.raises(ValueError, match="cannot remove 3 of 3"):
        keep_experts(torch.ones(3), 3)
