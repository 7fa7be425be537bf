"""The ``prune`` pass through ``compress`` on a tiny Llama: exact masks, recorded state, composition, config errors."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor import Recipe, compress
from compressor.core.arch import find_blocks
from compressor.pipeline.sequential import PipelineConfig
from compressor.algorithms.prune.masks import is_nm, prune_count
from compressor.core.sparsity import is_pruned, prune_mask

IDS = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
QUIET = PipelineConfig(batch_size=4, quiet=True)


def _prune(passes, calibration=IDS, model=None):
    model = model or tiny_llama()
    compress(model, Recipe.from_dict({"passes": passes}), calibration=calibration, pipeline=QUIET, quiet=True)
    return model


def _block_linears(model):
    name, blocks = find_blocks(model)
    return [(f"{name}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_unstructured_half_is_exact_and_recorded(method):
    model = _prune([{"prune": {"method": method, "sparsity": 0.5, "scope": "row"}}])
    linears = _block_linears(model)
    assert len(linears) == 14
    for name, m in linears:
        mask = prune_mask(m)
        assert is_pruned(m) and mask.dtype == torch.bool and mask.shape == m.weight.shape, name
        assert ((~mask).sum(1) == prune_count(m.weight.shape[1], 0.5)).all(), name
        assert (m.weight[~mask] == 0).all(), name
        assert m.sparsity_info.method == method and m.sparsity_info.sparsity == pytest.approx(0.5)
        assert "weight_mask" not in m.state_dict()  # masks stay out of checkpoints and exports
    assert not is_pruned(model.lm_head) and (model.lm_head.weight != 0).all()


@pytest.mark.parametrize("method,structure", [("sparsegpt", "2:4"), ("wanda", "4:8"), ("magnitude", "2:4")])
def test_nm_is_exact_in_every_layer(method, structure):
    model = _prune([{"prune": {"method": method, "structure": structure}}])
    n, m = map(int, structure.split(":"))
    for name, lin in _block_linears(model):
        assert is_nm(prune_mask(lin), n, m) and is_nm(lin.weight != 0, n, m), name


def test_sparsegpt_output_is_closer_to_dense_than_magnitude():
    dense = tiny_llama()
    with torch.no_grad():
        ref = dense(IDS).logits
    errs = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = _prune([{"prune": {"method": method, "sparsity": 0.5}}])
        with torch.no_grad():
            errs[method] = ((model(IDS).logits - ref) ** 2).mean().item()
    assert errs["sparsegpt"] < errs["magnitude"], errs


def test_magnitude_runs_without_calibration():
    model = tiny_llama()
    compress(model, Recipe.from_dict({"passes": [{"prune": {"method": "magnitude", "sparsity": 0.25}}]}), quiet=True)
    assert all(is_pruned(m) for _, m in _block_linears(model))


def test_wanda_without_calibration_names_the_fix():
    with pytest.raises(ValueError, match="calibration"):
        compress(tiny_llama(), Recipe.from_dict({"passes": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}))


@pytest.mark.parametrize("scheme", [{"bits": 4, "group_size": 16, "symmetric": False},
                                    {"bits": 4, "group_size": 16, "symmetric": True}])
def test_rtn_after_prune_keeps_zeros(scheme):
    model = _prune([{"prune": {"method": "sparsegpt", "structure": "2:4"}}, {"rtn": {"scheme": scheme}}])
    for name, lin in _block_linears(model):
        mask = prune_mask(lin)  # the buffer survives quantization
        assert hasattr(lin, "weight_scale") and is_nm(mask, 2, 4), name
        assert (lin.weight[~mask] == 0).all(), name  # integer zero points put 0 exactly on the grid


def test_prune_after_quantization_is_refused():
    with pytest.raises(ValueError, match="before the quantization pass"):
        _prune([{"rtn": {"scheme": {"bits": 4, "group_size": 16}}}, {"prune": {"method": "wanda", "sparsity": 0.5}}])


def test_nan_weights_raise():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress(model, Recipe.from_dict({"passes": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}), quiet=True)


@pytest.mark.parametrize("body,match", [
    ({"sparsity": 1.5}, r"in \[0, 1\)"),
    ({"structure": "5:4"}, "0 < N < M"),
    ({"structure": "2-4"}, "'2:4'"),
    ({"method": "obs", "sparsity": 0.5}, "magnitude"),
    ({}, "set sparsity"),
    ({"structure": "2:4", "sparsity": 0.5}, "remove sparsity"),
    ({"sparsity": 0.5, "scope": "column"}, "row"),
    ({"sparsity": 0.5, "block_size": 0}, "block_size"),
    ({"sparsity": 0.5, "dampening": 2}, "dampening"),
    ({"sparsty": 0.5}, "did you mean 'sparsity'"),
    ({"method": "magnitude", "sparsity": 0.5, "true_sequential": True}, "nothing to take in order"),
])
def test_config_errors_name_the_fix(body, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"passes": [{"prune": body}]})


STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _by_hand_true_sequential_wanda(model, sparsity: float) -> None:
    """Reference: for each block, each stage's input norms on the model whose earlier stages are already pruned."""
    from compressor.algorithms.prune.masks import select_mask
    from compressor.algorithms.prune.scores import InputNormAccumulator, wanda_scores

    for block in model.model.layers:
        for stage in STAGES:
            mods = {n: block.get_submodule(n) for n in stage}
            accs = {n: InputNormAccumulator(m.in_features) for n, m in mods.items()}
            hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0])) for n, m in mods.items()]
            with torch.no_grad():
                for batch in IDS.split(4):
                    model(batch)
            for h in hooks:
                h.remove()
            for n, m in mods.items():
                mask = select_mask(wanda_scores(m.weight.data, accs[n].norms), sparsity, "row")
                m.weight.data[~mask] = 0  # mask: True where kept


def test_true_sequential_wanda_takes_each_stage_on_the_pruned_stages_inputs():
    staged = _prune([{"prune": {"method": "wanda", "sparsity": 0.5, "true_sequential": True}}])
    ref = tiny_llama()
    _by_hand_true_sequential_wanda(ref, 0.5)
    plain = _prune([{"prune": {"method": "wanda", "sparsity": 0.5}}])
    differ = 0
    for (name, m), (_, r), (_, q) in zip(_block_linears(staged), _block_linears(ref), _block_linears(plain)):
        assert torch.equal(m.weight == 0, r.weight == 0), name
        differ += not torch.equal(m.weight == 0, q.weight == 0)
    assert differ > 0  # the dense-block calibration chooses other masks downstream of the first stage


def test_true_sequential_sparsegpt_keeps_the_structure():
    staged = _prune([{"prune": {"method": "sparsegpt", "structure": "2:4", "true_sequential": True}}])
    for name, m in _block_linears(staged):
        assert is_nm(prune_mask(m), 2, 4) and is_nm(m.weight != 0, 2, 4), name
