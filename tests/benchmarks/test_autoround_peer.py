"""benchmarks/_peer_autoround.py and its wiring in quant_quality.py, without AutoRound installed (dev venv)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import _common as common
from benchmarks import _peer_autoround as peer
from benchmarks import quant_quality


def test_autoround_kwargs_follow_its_own_recipes_at_our_protocol():
    w4g64, w3pc = common.parse_setting("w4g64"), common.parse_setting("w3pc")
    default = peer.autoround_kwargs("autoround", w4g64, 128, 512)
    assert default == {"bits": 4, "group_size": 64, "sym": False, "iters": 200, "nsamples": 128, "seqlen": 512,
                       "batch_size": 8, "seed": 42, "device_map": "cpu"}  # lr left to AutoRound (1 / iters)
    light = peer.autoround_kwargs("autoround-light", w3pc, 8, 128)
    assert light["iters"] == 50 and light["lr"] == 5e-3 and light["group_size"] == -1 and light["bits"] == 3
    assert peer.autoround_kwargs("autoround", w4g64, 4, 128, iters=2)["batch_size"] == 4  # never above nsamples
    assert peer.autoround_kwargs("autoround", w4g64, 128, 512, iters=2)["iters"] == 2
    with pytest.raises(ValueError, match="integer settings only"):
        peer.autoround_kwargs("autoround", common.parse_setting("nvfp4"), 128, 512)
    with pytest.raises(ValueError, match="unknown AutoRound method"):
        peer.autoround_kwargs("autoround-best", w4g64, 128, 512)


def test_iters_override_comes_from_set_and_nothing_else():
    assert peer._iters_override({"set": ["gptq.damp=0.1", "autoround.iters=3"]}) == 3
    assert peer._iters_override({"set": []}) is None and peer._iters_override({}) is None


def test_quant_quality_reports_a_missing_venv_and_settings_autoround_does_not_run(tmp_path):
    job = {"method": "autoround", **common.parse_setting("w4g64").job()}
    rec = quant_quality.run_job(job, common.PEER_PYTHON, False, tmp_path / "no-venv" / "python")
    assert rec["status"] == "unavailable" and "setup_peers.sh autoround" in rec["error"]
    for name in ("fp8", "mixed3.5"):
        rec = quant_quality.run_job({"method": "autoround-light", **common.parse_setting(name).job()},
                                    common.PEER_PYTHON, False, tmp_path / "no-venv" / "python")
        assert rec["status"] == "unavailable" and "AutoRound" in rec["error"], name


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).float()


def test_grid_check_tells_a_quantized_export_from_an_untouched_one():
    model = _tiny_llama()
    original = {name: w.detach().clone() for name, w in peer._checked_weights(model).items()}
    setting = common.Setting(4, 32, "int", False, None)
    untouched = peer.grid_check(original, model, setting)
    assert untouched["max_levels"] > 16 and untouched["changed"] == 0.0
    with torch.no_grad():  # asymmetric 4-bit min-max per group of 32, the weights quantize-dequantized in place
        for w in peer._checked_weights(model).values():
            g = w.view(w.shape[0], -1, 32)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = (hi - lo) / 15
            g.copy_(torch.round((g - lo) / scale) * scale + lo)
    quantized = peer.grid_check(original, model, setting)
    assert quantized["max_levels"] <= 16 and quantized["changed"] > 0.5
