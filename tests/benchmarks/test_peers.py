"""The AutoRound and GPTQModel peer runners and their wiring in quant_quality.py, run in the dev venv (neither
peer installed): what they ask the peer for, how they read its export, and the checks that keep a run honest."""

from __future__ import annotations

import pytest
import torch

from benchmarks import _common as common
from benchmarks import _peer_autoround as peer
from benchmarks import _peer_gptqmodel as gptqmodel
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


@pytest.mark.parametrize("method,setup", [("autoround", "setup_peers.sh autoround"),
                                          ("autoround-light", "setup_peers.sh autoround"),
                                          ("gptqmodel", "setup_peers.sh gptqmodel")])
def test_quant_quality_reports_a_missing_venv_and_settings_the_peer_does_not_run(tmp_path, method, setup):
    nowhere = {peer: tmp_path / "no-venv" / "python" for peer in quant_quality.PEER_VENVS}
    rec = quant_quality.run_job({"method": method, **common.parse_setting("w4g64").job()}, common.PEER_PYTHON, False,
                                nowhere)
    assert rec["status"] == "unavailable" and setup in rec["error"]
    for name in ("fp8", "mixed3.5"):
        rec = quant_quality.run_job({"method": method, **common.parse_setting(name).job()}, common.PEER_PYTHON, False,
                                    nowhere)
        assert rec["status"] == "unavailable" and quant_quality.VENV_LABELS[quant_quality.VENV_METHODS[method]] \
            in rec["error"], name


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Brute-force GPTQ packing: the codes of each column as one little-endian bit stream of int32 words."""
    n, cols = codes.shape
    words = -(-n * bits // 32)
    out = torch.zeros(words, cols, dtype=torch.int64)
    for c in range(cols):
        stream = sum(int(v) << (i * bits) for i, v in enumerate(codes[:, c].tolist()))
        for w in range(words):
            out[w, c] = (stream >> (32 * w)) & 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # as int32 words, sign bit included


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_unpacking_matches_a_brute_force_packer(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 5))
    assert torch.equal(gptqmodel.unpack_codes(_pack(codes, bits), bits, 96), codes)
    with pytest.raises(ValueError, match="need"):
        gptqmodel.unpack_codes(_pack(codes, bits), bits, 96 * 2 + 32)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (4, 96)])
def test_dequantize_gptq_is_scale_times_code_minus_zero_per_group(bits, group):
    torch.manual_seed(0)
    n_in, n_out = 96, 32
    groups = n_in // group
    codes = torch.randint(0, 2**bits, (n_in, n_out))
    zeros = torch.randint(1, 2**bits, (groups, n_out))
    scales = torch.rand(groups, n_out, dtype=torch.float16) + 0.01
    g_idx = torch.arange(n_in, dtype=torch.int32) // group
    weight = gptqmodel.dequantize_gptq(_pack(codes, bits), _pack((zeros - 1).t(), bits).t(), scales, g_idx, bits)
    expected = torch.empty(n_out, n_in)
    for i in range(n_in):
        for o in range(n_out):
            g = i // group
            expected[o, i] = float(scales[g, o]) * (int(codes[i, o]) - int(zeros[g, o]))
    assert weight.dtype == torch.float32 and weight.shape == (n_out, n_in)
    assert torch.equal(weight, expected)


def test_gptqmodel_config_is_the_grid_and_what_per_channel_needs():
    assert gptqmodel.quantize_config_kwargs(common.parse_setting("w3g64")) == {"bits": 3, "group_size": 64,
                                                                               "sym": False}
    # per-channel: its default act_group_aware=True raises ("requires `group_size > 0`"), so it is turned off there
    assert gptqmodel.quantize_config_kwargs(common.parse_setting("w4pc")) == {"bits": 4, "group_size": -1, "sym": False,
                                                                              "act_group_aware": False}
    with pytest.raises(ValueError, match="integer settings only"):
        gptqmodel.quantize_config_kwargs(common.parse_setting("mxfp4"))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).float()


def test_grid_check_tells_a_quantized_export_from_an_untouched_one():
    model = _tiny_llama()
    original = common.checked_weights(model, copy=True)
    setting = common.Setting(4, 32, "int", False, None)
    untouched = common.grid_check(original, model, setting)
    assert untouched["max_levels"] > 16 and untouched["changed"] == 0.0 and not common.on_grid(untouched, setting)
    with torch.no_grad():  # asymmetric 4-bit min-max per group of 32, the weights quantize-dequantized in place
        for w in common.checked_weights(model).values():
            g = w.view(w.shape[0], -1, 32)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = (hi - lo) / 15
            g.copy_(torch.round((g - lo) / scale) * scale + lo)
    quantized = common.grid_check(original, model, setting)
    assert quantized["max_levels"] <= 16 and quantized["changed"] > 0.5 and common.on_grid(quantized, setting)


def test_peer_record_starts_every_peer_runner_the_same_way():
    setting, record = common.peer_record({"method": "gptqmodel", **common.parse_setting("w3g64").job()},
                                         "torch", peer="gptqmodel")
    assert setting == common.parse_setting("w3g64")
    assert record["method"] == "gptqmodel" and record["setting"] == "w3g64" and record["peer"] == "gptqmodel"
    assert record["versions"]["torch"] == torch.__version__ and record["machine"]["cores"] >= 1
    assert record["status"] is None and record["ppl"] is None


def test_autoround_restore_puts_back_only_what_it_does_not_quantize(tmp_path):
    """The export AutoRound writes on CPU is 16-bit throughout; the runner restores, from the fp32 checkpoint's
    files, the tensors AutoRound leaves unquantized (embeddings, norms) and keeps its linear weights."""
    from tests.helpers import tiny_llama

    fp32 = tiny_llama(layers=2)
    fp32.save_pretrained(tmp_path)
    exported = tiny_llama(layers=2)
    with torch.no_grad():
        for t in exported.state_dict().values():
            t.copy_(t.bfloat16().float() + 0.25)  # stands for AutoRound's 16-bit, quantized export
    linears = {n for n, m in exported.named_modules() if isinstance(m, torch.nn.Linear)
               and m is not exported.get_output_embeddings()}
    copied = peer.restore_unquantized(exported, tmp_path)
    src, out = fp32.state_dict(), exported.state_dict()
    assert copied >= 2 * 2 + 2 and linears  # two norms per block, the final norm, the embeddings
    for name, t in out.items():
        if name.rsplit(".", 1)[0] in linears:
            assert not torch.equal(t, src[name]), name
        else:
            assert torch.equal(t, src[name]), name
