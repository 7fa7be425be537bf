"""benchmarks/transforms.py without SmolLM2: argument parsing, job planning, the recipes on a tiny model."""

from __future__ import annotations

import re

import pytest
import torch
from tests.helpers import load_benchmark, tiny_llama

from compressor import Recipe, compress
from compressor.runtime.activations import activation_quantizers, qk_rotations
from compressor.runtime.online import online_transforms


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("transforms")


def _keys(jobs) -> list[tuple[str, str, str]]:
    return [(j["method"], j["setting"], j["transform"]) for j in jobs]


def test_default_plan_is_the_full_grid(bench):
    _, jobs, protocol = bench.plan([])
    assert protocol == {"n_calib": 128, "calib_len": 512, "max_tokens": 32768, "threads": None, "split": "test", "ost_steps": 100,
                        "reload": False}
    assert all(j["n_calib"] == 128 and j["max_tokens"] == 32768 for j in jobs)
    expected = []
    for t in ("none", "hadamard", "ostquant"):
        if t != "ostquant":  # learned for a quantized setting: no fp32 line
            expected.append(("fp32", "fp32", t))
        expected += [(m, s, t) for s in ("w4a16", "w4a4kv4") for m in ("rtn", "gptq")]
    assert _keys(jobs) == expected  # 2 fp32 lines + 2 settings x 3 transforms x 2 methods


def test_quick_plan_keeps_one_gptq_job(bench):
    _, jobs, protocol = bench.plan(["--quick", "--threads", "2"])
    assert protocol == {"n_calib": 8, "calib_len": 128, "max_tokens": 2048, "threads": 2, "split": "test", "ost_steps": 8,
                        "reload": False}
    assert [k for k in _keys(jobs) if k[0] == "gptq"] == [("gptq", "w4a4kv4", "hadamard")]
    assert len(jobs) == 2 + 6 + 1
    _, jobs, _ = bench.plan(["--quick", "--methods", "gptq", "--settings", "w4a16"])  # explicit: not trimmed
    assert _keys(jobs) == [("gptq", "w4a16", "none"), ("gptq", "w4a16", "hadamard"), ("gptq", "w4a16", "ostquant")]


def test_subsets(bench):
    _, jobs, _ = bench.plan(["--methods", "RTN, fp32", "--settings", "w4a4kv4", "--transforms", "hadamard"])
    assert _keys(jobs) == [("fp32", "fp32", "hadamard"), ("rtn", "w4a4kv4", "hadamard")]


@pytest.mark.parametrize("argv,match", [
    (["--transforms", "spinquant"], "unknown transform 'spinquant'"),
    (["--ost-steps", "0"], "--ost-steps must be a positive integer"),
    (["--methods", "awq"], "unknown method 'awq'"),
    (["--settings", "w8a8"], "unknown setting 'w8a8'"),
    (["--settings", ","], "--settings is empty"),
    (["--max-tokens", "100"], "at least one window"),
    (["--threads", "0"], "positive integer"),
])
def test_bad_arguments_exit_with_the_reason(bench, capsys, argv, match):
    with pytest.raises(SystemExit):
        bench.plan(argv)
    assert re.search(match, capsys.readouterr().err)


def test_records_and_recipes(bench):
    rec = bench.base_record({"method": "gptq", "setting": "w4a4kv4", "transform": "hadamard"})
    assert rec["weights"] == {"bits": 4, "group_size": -1, "symmetric": False}
    assert rec["activations"] == {"bits": 4, "symmetric": True, "clip_ratio": 1.0, "learned_clip": False}
    assert rec["kv_cache"] == {"bits": 4, "symmetric": False, "group_size": None}
    assert [next(iter(p)) for p in rec["recipe"]["passes"]] == ["rotate", "gptq", "quantize_activations"]
    fp32 = bench.base_record({"method": "fp32", "setting": "fp32", "transform": "none"})
    assert fp32["recipe"]["passes"] == [] and fp32["weights"] is None and fp32["kv_cache"] is None
    for job in bench.plan_jobs():  # every planned recipe is a valid recipe
        Recipe.from_dict(bench.recipe_dict(job))


def test_quarot_recipe_runs_on_a_tiny_llama(bench):
    recipe = Recipe.from_dict(bench.recipe_dict({"method": "rtn", "setting": "w4a4kv4", "transform": "hadamard"}))
    model = compress(tiny_llama(hidden=64, inter=96), recipe, quiet=True)
    assert len(online_transforms(model)) == 4 and len(qk_rotations(model)) == 2  # R4 and o_proj, 2 blocks
    assert len(activation_quantizers(model)) == 14 + 2
    assert model.rotation_info["r3"] == 16
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12)[None]).logits).all()


def test_ostquant_trains_for_the_setting_it_is_measured_in(bench):
    _, jobs, _ = bench.plan(["--transforms", "ostquant", "--ost-steps", "7", "--n-calib", "16"])
    by_key = {(j["method"], j["setting"]): j for j in jobs}
    passes = bench.recipe_dict(by_key["gptq", "w4a4kv4"])["passes"]
    assert [next(iter(p)) for p in passes] == ["ostquant", "gptq", "quantize_activations"]
    ost = passes[0]["ostquant"]
    assert (ost["steps"], ost["samples"]) == (7, 16)
    assert ost["weight"] is None  # before GPTQ: trained with fp weights (SpinQuant's practice)
    assert (ost["bits"], ost["kv_bits"], ost["symmetric"], ost["kv_symmetric"]) == (4, 4, True, False)
    assert ost["learn_clip"] and ost["range_grad"]  # clip ratios learned per block input for A4
    assert bench.base_record(by_key["gptq", "w4a4kv4"])["activations"]["learned_clip"] is True
    hadamard = {"method": "gptq", "setting": "w4a4kv4", "transform": "hadamard"}
    assert bench.base_record(hadamard)["activations"]["learned_clip"] is False
    w4a16 = bench.recipe_dict(by_key["rtn", "w4a16"])["passes"]
    assert [next(iter(p)) for p in w4a16] == ["ostquant", "rtn"]
    assert (w4a16[0]["ostquant"]["bits"], w4a16[0]["ostquant"]["kv_bits"]) == (None, None)
    assert w4a16[0]["ostquant"]["learn_clip"] is False  # no input quantization, no clip to learn
    assert w4a16[0]["ostquant"]["weight"] == bench.WEIGHTS  # before RTN: trained under RTN weights
    with pytest.raises(ValueError, match="no fp32 line"):
        bench.recipe_dict({"method": "fp32", "setting": "fp32", "transform": "ostquant"})


def test_ostquant_rot_learns_the_rotations_only_and_is_opt_in(bench):
    _, jobs, _ = bench.plan([])
    assert "ostquant-rot" not in {j["transform"] for j in jobs}
    _, jobs, _ = bench.plan(["--transforms", "ostquant-rot", "--methods", "fp32,gptq", "--settings", "w4a4kv4"])
    assert _keys(jobs) == [("gptq", "w4a4kv4", "ostquant-rot")]  # learned: no fp32 line
    ost = bench.recipe_dict(jobs[0])["passes"][0]["ostquant"]
    assert not any(ost[k] for k in ("smooth_norm", "smooth_ov", "smooth_up_down", "smooth_qk"))
    assert ost["rotate_ov"] and ost["online_o"] and ost["weight"] is None


def test_ostquant_recipe_runs_on_a_tiny_llama(bench):
    job = {"method": "rtn", "setting": "w4a4kv4", "transform": "ostquant", "ost_steps": 2, "n_calib": 2}
    data = bench.recipe_dict(job)
    data["passes"][0]["ostquant"]["top_k"] = 16  # the tiny vocabulary has 96 tokens
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model = compress(tiny_llama(hidden=64, inter=96), Recipe.from_dict(data), calibration=ids, quiet=True)
    assert model.rotation_info["method"] == "ostquant" and model.rotation_info["steps"] == 2
    assert len(activation_quantizers(model)) == 14 + 2


def test_w4a8_is_on_request_and_reload_reproduces_the_perplexity(bench):
    _, jobs, protocol = bench.plan(["--settings", "w4a8", "--transforms", "hadamard", "--methods", "rtn", "--reload"])
    assert _keys(jobs) == [("rtn", "w4a8", "hadamard")] and protocol["reload"] is True
    rec = bench.base_record(jobs[0])
    assert rec["activations"]["bits"] == 8 and rec["kv_cache"] is None
    model = tiny_llama(hidden=64, inter=96)
    model.config.max_position_embeddings = 512  # the protocol's windows (default RoPE does not depend on it)
    model = compress(model, Recipe.from_dict(bench.recipe_dict(jobs[0])), quiet=True)
    ids = torch.randint(0, 96, (1100,), generator=torch.Generator().manual_seed(0))
    want = bench.common.perplexity(model, ids, 1024)["ppl"]
    got = bench._reload(model, ids, 1024)
    assert got["ppl_reloaded"] == want and got["export_mb"] > 0


# ---------------------------------------------------------------- llm-compressor peers (no peer venv needed)

PEERS = ("llmc-spinquant", "llmc-spinquant-r3", "llmc-quip")


def test_peer_transforms_are_opt_in_with_rtn_and_gptq_only(bench):
    _, jobs, _ = bench.plan([])
    assert not any(j["transform"].startswith("llmc-") for j in jobs)
    _, jobs, _ = bench.plan(["--transforms", "llmc-spinquant,LLMC-QUIP", "--settings", "w4a4kv4,w4a8"])
    assert _keys(jobs) == [(m, s, t) for t in ("llmc-spinquant", "llmc-quip") for s in ("w4a4kv4", "w4a8")
                           for m in ("rtn", "gptq")]  # no fp32 line
    _, jobs, _ = bench.plan(["--quick", "--transforms", "llmc-spinquant-r3"])  # --quick keeps gptq for hadamard only
    assert _keys(jobs) == [("rtn", "w4a16", "llmc-spinquant-r3"), ("rtn", "w4a4kv4", "llmc-spinquant-r3")]
    _, jobs, _ = bench.plan(["--transforms", "hadamard,llmc-quip", "--methods", "fp32,rtn", "--settings", "w4a16"])
    assert _keys(jobs) == [("fp32", "fp32", "hadamard"), ("rtn", "w4a16", "hadamard"), ("rtn", "w4a16", "llmc-quip")]


@pytest.mark.parametrize("argv,match", [
    (["--transforms", "llmc-quip", "--methods", "fp32"], "nothing to run"),
    (["--transforms", "llmc-awq"], "unknown transform 'llmc-awq'.*llmc-spinquant, llmc-spinquant-r3, llmc-quip"),
])
def test_bad_peer_arguments_exit_with_the_reason(bench, capsys, argv, match):
    with pytest.raises(SystemExit):
        bench.plan(argv)
    assert re.search(match, capsys.readouterr().err)


def test_peer_python_option(bench, tmp_path):
    args, _, _ = bench.plan(["--transforms", "llmc-quip"])
    assert args.peer_python == bench.common.ROOT / ".venv-bench" / "bin" / "python"
    args, _, _ = bench.plan(["--transforms", "llmc-quip", "--peer-python", str(tmp_path / "py")])
    assert args.peer_python == tmp_path / "py"


def _modifier_args(record, name):
    (args,) = [m["args"] for m in record["modifiers"] if m["modifier"] == name]
    return args


def test_peer_records_use_our_grids_in_llmcompressor_terms(bench):
    rec = bench.base_record({"method": "rtn", "setting": "w4a4kv4", "transform": "llmc-spinquant"})
    assert rec["peer"] == "llm-compressor" and rec["transform"] == "llmc-spinquant" and rec["recipe"] is None
    assert [m["modifier"] for m in rec["modifiers"]] == ["SpinQuantModifier", "QuantizationModifier"]
    assert _modifier_args(rec, "SpinQuantModifier") == {"rotations": ["R1", "R2", "R4"], "transform_type": "hadamard",
                                                        "transform_block_size": 64}
    quant = _modifier_args(rec, "QuantizationModifier")
    assert quant["ignore"] == ["lm_head"]
    group = quant["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"}
    assert group["input_activations"] == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token",
                                          "dynamic": True}
    assert quant["kv_cache_scheme"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                        "group_size": 64, "dynamic": True}  # per head (64) and token
    assert rec["weights"] == bench.WEIGHTS and rec["kv_cache"] == {"bits": 4, "symmetric": False, "group_size": None}

    r3 = bench.base_record({"method": "gptq", "setting": "w4a8", "transform": "llmc-spinquant-r3"})
    assert _modifier_args(r3, "SpinQuantModifier")["rotations"] == ["R1", "R2", "R3", "R4"]
    gptq = _modifier_args(r3, "GPTQModifier")
    assert gptq["config_groups"]["group_0"]["input_activations"]["num_bits"] == 8 and "kv_cache_scheme" not in gptq

    quip = bench.base_record({"method": "rtn", "setting": "w4a16", "transform": "llmc-quip"})
    assert _modifier_args(quip, "QuIPModifier") == {"rotations": ["v"], "transform_type": "hadamard",
                                                    "transform_block_size": 64}
    w_only = _modifier_args(quip, "QuantizationModifier")
    assert "input_activations" not in w_only["config_groups"]["group_0"] and "kv_cache_scheme" not in w_only
    assert quip["activations"] is None and quip["kv_cache"] is None
    assert bench.peer_modifiers({"method": "rtn", "setting": "w4a4kv4", "transform": "llmc-quip"},
                                head_dim=32)[1]["args"]["kv_cache_scheme"]["group_size"] == 32
    with pytest.raises(ValueError, match="peer venv"):
        bench.recipe_dict({"method": "rtn", "setting": "w4a16", "transform": "llmc-quip"})
    with pytest.raises(ValueError, match="no llm-compressor recipe"):
        bench.peer_modifiers({"method": "fp32", "setting": "fp32", "transform": "llmc-quip"})
    with pytest.raises(ValueError, match="no llm-compressor recipe"):
        bench.peer_modifiers({"method": "rtn", "setting": "w4a16", "transform": "hadamard"})


def test_clipped_setting_runs_ours_and_skips_the_peers(bench):
    _, jobs, _ = bench.plan(["--transforms", "hadamard,llmc-quip", "--methods", "gptq",
                             "--settings", "w4a4kv4,w4a4kv4-clip"])
    assert _keys(jobs) == [("gptq", "w4a4kv4", "hadamard"), ("gptq", "w4a4kv4-clip", "hadamard"),
                           ("gptq", "w4a4kv4", "llmc-quip")]
    acts = bench.recipe_dict(jobs[1])["passes"][-1]["quantize_activations"]
    assert acts["clip_ratio"] == 0.9 and acts["kv_bits"] == 4
    assert bench.base_record(jobs[1])["activations"]["clip_ratio"] == 0.9


def test_missing_peer_venv_gives_an_unavailable_line(bench, tmp_path):
    _, jobs, _ = bench.plan(["--transforms", "llmc-quip", "--methods", "rtn", "--settings", "w4a16", "--quick"])
    rec = bench.run_job(jobs[0], verbose=False, peer_python=tmp_path / "missing" / "python")
    assert rec["status"] == "unavailable" and "setup_peers.sh" in rec["error"]
    assert (rec["peer"], rec["transform"], rec["method"], rec["ppl"]) == ("llm-compressor", "llmc-quip", "rtn", None)


def test_peer_script_helpers_without_llmcompressor(bench):
    peer = load_benchmark("_peer_llmc_transforms")  # imports only _common, _peer_llmcompressor and transforms
    assert peer.needs_data({"method": "gptq", "setting": "w4a16"})
    assert peer.needs_data({"method": "rtn", "setting": "w4a4kv4"})  # a kv_cache_scheme asks for data
    assert not peer.needs_data({"method": "rtn", "setting": "w4a8"})
    assert peer._levels(torch.tensor([[0.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])) == 3
    checks = {"weights": {"applied": True}, "input_activations": None, "kv_cache": {"applied": False}}
    assert peer._not_applied(checks) == ["kv_cache"]


# ---------------------------------------------------------------- the protocol without compressor


def test_gptaq_is_asymmetric_gptq_on_request_and_the_peers_skip_it(bench):
    assert "gptaq" not in {k[0] for k in _keys(bench.plan_jobs())}
    _, jobs, _ = bench.plan(["--transforms", "hadamard,llmc-quip", "--methods", "gptaq", "--settings", "w4a4kv4"])
    assert _keys(jobs) == [("gptaq", "w4a4kv4", "hadamard")]
    passes = bench.recipe_dict(jobs[0])["passes"]
    assert passes[1] == {"gptq": {"scheme": bench.WEIGHTS, "asymmetric": True}}
    (_, gptq, _) = Recipe.from_dict(bench.recipe_dict(jobs[0])).build()
    assert gptq.config.asymmetric


def test_dev_split_and_overrides_reach_the_recipe(bench):
    """Choosing a setting: --split dev scores SOTU 2000-2009, --set changes our pass (and only where it exists)."""
    _, jobs, protocol = bench.plan(["--transforms", "ostquant", "--methods", "gptq", "--settings", "w4a4kv4",
                                    "--split", "dev", "--set", "ostquant.lr_clip=0.01", "--set", "rtn.scheme.bits=3"])
    assert protocol["split"] == "dev" and protocol["set"] == ["ostquant.lr_clip=0.01", "rtn.scheme.bits=3"]
    (job,) = jobs
    recipe = bench.common.with_overrides(bench.recipe_dict(job), job["set"])
    (ost,) = [p["ostquant"] for p in recipe["passes"] if "ostquant" in p]
    assert ost["lr_clip"] == 0.01 and not any("rtn" in p for p in recipe["passes"])
