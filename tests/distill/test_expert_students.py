"""Distilling students with fused MoE experts: each expert trains on its own grid and keeps its mask."""

from __future__ import annotations

import pytest
import torch
from tests.test_families import IDS, MOE, tiny

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.algorithms.distill.students import prepare_student
from compressor.core.scheme import QParams, fake_quant
from compressor.core.sparsity import MASK_SUFFIX
from compressor.core.state import experts_quant_state, is_experts_quantized

PRUNE = {"prune": {"method": "wanda", "structure": "2:4"}}
RTN = {"rtn": {"scheme": {"bits": 4, "group_size": 32}}}


def _compressed(passes):
    model = tiny("qwen3_moe", **MOE)
    compress(model, Recipe.from_dict({"passes": passes}), calibration=IDS, quiet=True)
    return model


def _on_grid(experts) -> bool:
    scheme, qps = experts_quant_state(experts)
    for pname, qp in qps.items():
        w = getattr(experts, pname).detach()
        e, n, k = w.shape
        zp = None if qp.zero_point is None else qp.zero_point.reshape(e * n, -1)
        if not torch.equal(fake_quant(w.reshape(e * n, k), QParams(qp.scale.reshape(e * n, -1), zp), scheme),
                           w.reshape(e * n, k)):
            return False
    return True


@pytest.mark.parametrize("tune", [{"distill": {"steps": 6, "batch_size": 2, "lr": 1e-3}},
                                  {"distill_blocks": {"iters": 10, "lr": 1e-3, "batch_size": 4}}],
                         ids=["distill", "distill_blocks"])
def test_quantized_pruned_experts_train_on_their_grid_and_keep_their_masks(tune, tmp_path):
    before = _compressed([PRUNE, RTN])
    model = _compressed([PRUNE, RTN, tune])
    for layer, ref in zip(model.model.layers, before.model.layers):
        experts = layer.mlp.experts
        assert is_experts_quantized(experts) and "forward" not in experts.__dict__  # state restored after training
        assert not torch.equal(experts.down_proj, ref.mlp.experts.down_proj)  # the experts did train
        assert _on_grid(experts)
        for pname in ("gate_up_proj", "down_proj"):
            assert not getattr(experts, pname)[~experts._buffers[pname + MASK_SUFFIX]].any()
    with torch.no_grad():
        ref_logits = model(IDS[:2]).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "e"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS[:2]).logits, ref_logits, rtol=0, atol=1e-6)


def test_the_experts_fake_quant_runs_once_per_forward():
    model = _compressed([RTN])
    state = prepare_student(model)
    experts = model.model.layers[0].mlp.experts
    calls = []
    for pname in ("gate_up_proj", "down_proj"):
        experts.parametrizations[pname][0].register_forward_hook(lambda *a, pname=pname: calls.append(pname))
    model(IDS[:1]).logits.sum().backward()
    assert sorted(calls) == ["down_proj", "gate_up_proj"]  # not once per expert
    assert experts.parametrizations["down_proj"].original.grad is not None
    state.finish()
    assert _on_grid(experts)


def test_pruned_only_experts_stay_pruned_through_distillation():
    model = _compressed([PRUNE, {"distill": {"steps": 4, "batch_size": 2, "lr": 1e-3}}])
    experts = model.model.layers[1].mlp.experts
    for pname in ("gate_up_proj", "down_proj"):
        assert not getattr(experts, pname)[~experts._buffers[pname + MASK_SUFFIX]].any()
