"""Prune then quantize in one recipe: masks survive GPTQ, RTN and AdaRound, the export and a resumed run."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import tiny_llama
from torch import nn

from compressor import Recipe, compress
from compressor.core.arch import find_blocks
from compressor.export.compressed_tensors import save_compressed
from compressor.export.loader import load_compressed
from compressor.runtime.quant_linear import QuantLinear
from compressor.algorithms.hessian import HessianAccumulator
from compressor.pipeline.sequential import PipelineConfig
from compressor.passes import prune as prune_pass
from compressor.algorithms.prune.masks import is_nm, nm_mask
from compressor.core.sparsity import is_pruned, prune_mask
from compressor.algorithms.quant.gptq import gptq_quantize
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant

IDS = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
QUIET = PipelineConfig(batch_size=4, quiet=True)


def _problem(n=16, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3  # correlated inputs
    acc = HessianAccumulator(k)
    acc.add(x)
    w = torch.randn(n, k, generator=g)
    mask = nm_mask(w.abs(), 2, 4)
    return w.masked_fill(~mask, 0), acc.H, mask


def _out_err(w, w_hat, h):
    d = (w - w_hat).double()
    return float(((d @ h.double()) * d).sum())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size,actorder", [(16, "none"), (20, "group"), (-1, "static")])
def test_gptq_keeps_pruned_weights_exactly_zero(symmetric, group_size, actorder):
    w, h, mask = _problem()
    scheme = QuantScheme(bits=3, group_size=group_size, symmetric=symmetric)
    res = gptq_quantize(w, h, scheme, actorder=actorder, mask=mask, refit=True, block_size=8)
    assert (res.weight[~mask] == 0).all()
    if symmetric:
        assert (res.codes[~mask] == 0).all()
    else:  # the zero point's code, in each pruned weight's group
        zp = res.qparams.zero_point[:, (res.g_idx if res.g_idx is not None else torch.arange(48) // scheme.group_width(48)).long()]
        assert torch.equal(res.codes[~mask].float(), zp[~mask].float())
    # and it still beats round-to-nearest of the pruned weight on the layer's output error
    rtn = fake_quant(w, compute_qparams(w, scheme), scheme).masked_fill(~mask, 0)
    assert _out_err(w, res.weight, h) < _out_err(w, rtn, h)


def test_gptq_mask_errors():
    w, h, mask = _problem()
    with pytest.raises(ValueError, match="bool tensor"):
        gptq_quantize(w, h, QuantScheme(bits=4, group_size=16), mask=mask.float())
    with pytest.raises(ValueError, match="exact zero"):
        gptq_quantize(w, h, QuantScheme(bits=4, group_size=16, symmetric=False, zero_point="float"), mask=mask)


def _block_linears(model):
    name, blocks = find_blocks(model)
    return [(f"{name}.{n}", m) for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]


QUANT = {
    "gptq": {"gptq": {"scheme": {"bits": 4, "group_size": 16, "symmetric": False}}},
    "rtn": {"rtn": {"scheme": {"bits": 4, "group_size": 16}}},
    "adaround": {"adaround": {"scheme": {"bits": 4, "group_size": 16, "symmetric": False}, "iters": 20}},
    "adaround-block": {"adaround": {"scheme": {"bits": 4, "group_size": 16}, "iters": 20, "granularity": "block"}},
}


@pytest.mark.parametrize("quant", list(QUANT))
def test_nm_masks_survive_quantization(quant):
    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "wanda", "structure": "2:4"}}, QUANT[quant]]})
    compress(model, recipe, calibration=IDS, pipeline=QUIET, quiet=True)
    for name, m in _block_linears(model):
        mask = prune_mask(m)
        assert is_pruned(m) and hasattr(m, "quant_scheme"), name
        assert is_nm(mask, 2, 4), name  # the mask itself is exactly 2:4
        assert not (m.weight[~mask] != 0).any(), name  # and nothing pruned came back


def test_export_records_sparsity_and_reloads_with_the_zeros(tmp_path):
    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "sparsegpt", "structure": "2:4"}}, QUANT["gptq"]]})
    compress(model, recipe, calibration=IDS, pipeline=QUIET, quiet=True)
    out = save_compressed(model, tmp_path / "export")
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "2:4"
    assert set(sc["targets"]) == {n for n, _ in _block_linears(model)} and "lm_head" in sc["ignore"]
    linear_weights = sum(m.weight.numel() for _, m in _block_linears(model))
    assert sc["global_sparsity"] == pytest.approx(0.5 * linear_weights / sum(p.numel() for p in model.parameters()))
    loaded = load_compressed(out)
    for name, m in _block_linears(model):
        q = loaded.get_submodule(name)
        assert isinstance(q, QuantLinear)
        assert torch.equal(q.dequantized_weight().float(), m.weight.float()), name
        assert not (q.dequantized_weight()[~prune_mask(m)] != 0).any(), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_resumed_run_restores_masks_and_is_bit_identical(tmp_path, monkeypatch):
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "wanda", "sparsity": 0.5}}, QUANT["gptq"]]})
    full = tiny_llama(layers=3)
    compress(full, recipe, calibration=IDS, pipeline=QUIET, quiet=True)
    ref = save_compressed(full, tmp_path / "ref")
    ckpt = PipelineConfig(batch_size=4, quiet=True, checkpoint_dir=tmp_path / "ckpt")
    real_end = prune_pass.PrunePass.end_block

    def crash_on_block_1(self, block, prefix, **kw):
        if prefix.endswith(".1"):
            raise KeyboardInterrupt
        return real_end(self, block, prefix, **kw)

    monkeypatch.setattr(prune_pass.PrunePass, "end_block", crash_on_block_1)
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_llama(layers=3), recipe, calibration=IDS, pipeline=ckpt, quiet=True)
    monkeypatch.setattr(prune_pass.PrunePass, "end_block", real_end)
    resumed = tiny_llama(layers=3)
    compress(resumed, recipe, calibration=IDS, pipeline=ckpt, quiet=True)
    for (name, a), (_, b) in zip(_block_linears(full), _block_linears(resumed)):
        assert "weight_mask" in b._buffers, name  # restored from the checkpoint, not guessed from zeros
        assert torch.equal(prune_mask(a), prune_mask(b)) and b.sparsity_info == a.sparsity_info, name
    out = save_compressed(resumed, tmp_path / "resumed")
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


def test_inspect_lists_and_plots_layer_sparsity(tmp_path, capsys):
    from compressor.cli import main
    from compressor.inspect import layer_sparsity

    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "wanda", "sparsity": 0.6, "allocation": "owl",
                                                     "owl_threshold": 3.0}}, QUANT["rtn"]]})
    compress(model, recipe, calibration=IDS, pipeline=QUIET, quiet=True)
    out = save_compressed(model, tmp_path / "export")
    got = layer_sparsity(out)
    for name, m in _block_linears(model):
        assert got[name] == pytest.approx(float((m.weight == 0).float().mean())), name
    assert main(["inspect", str(out), "--sparsity", "--plot", str(tmp_path / "s.png")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "mean over layers" in text
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pruned_only_export_is_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    recipe = Recipe.from_dict({"passes": [{"prune": {"method": "wanda", "structure": "2:4"}}]})
    out = tmp_path / "pruned"
    compress(model, recipe, calibration=IDS, pipeline=QUIET, quiet=True, output=out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "compressor_manifest.json").read_text())
    assert manifest["sparsity_config"]["sparsity_structure"] == "2:4"
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, m in _block_linears(model):
        w = loaded.get_submodule(name).weight
        assert torch.equal(w, m.weight) and not (w[~prune_mask(m)] != 0).any(), name
