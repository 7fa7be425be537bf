"""The benchmark scripts' helpers: setting parsing, child runs, photo crops, the SAME-padding rewrite."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from benchmarks import _common as common


@pytest.mark.parametrize("text,bits,group,name", [("w4g64", 4, 64, "w4g64"), ("W3PC", 3, -1, "w3pc"), (" w2g128 ", 2, 128, "w2g128")])
def test_parse_setting(text, bits, group, name):
    s = common.parse_setting(text)
    assert (s.bits, s.group_size, s.name) == (bits, group, name)
    assert s.scheme() == {"bits": bits, "group_size": group, "symmetric": False}


@pytest.mark.parametrize("text,match", [("w4", "unknown setting"), ("w4g0", "group size 0"), ("w4g32", "Q4_1"), ("int4", "unknown")])
def test_parse_setting_refuses(text, match):
    with pytest.raises(ValueError, match=match):
        common.parse_setting(text)


def test_mixed_setting_puts_allocate_bits_before_the_weight_pass():
    from benchmarks import quant_quality

    s = common.parse_setting("mixed-3.5bpw")
    assert s.name == "mixed-3.5bpw" and s.bpw == 3.5 and common.parse_setting("mixed3.5") == s and common.setting_of(s.job()) == s
    assert common.base_record("gptaq", s)["target_bpw"] == 3.5
    passes = quant_quality.recipe_data("awq-gptq", s)["passes"]
    assert [next(iter(p)) for p in passes] == ["awq", "allocate_bits", "gptq"]
    assert passes[1]["allocate_bits"] == {"target_bpw": 3.5}
    peer = quant_quality.run_job({"method": "llmc-gptq", **s.job()}, common.PEER_PYTHON, False)
    assert peer["status"] == "unavailable" and "bits-per-weight" in peer["error"]


def test_inputs_first_methods_put_quantize_activations_before_gptaq():
    from benchmarks import quant_quality

    s = common.parse_setting("w4a4-nvfp4")
    passes = quant_quality.recipe_data("qa-gptaq", s)["passes"]
    assert passes == [{"quantize_activations": {"format": "nvfp4", "bits": 4}},
                      {"gptq": {"scheme": s.scheme(), "asymmetric": True}}]
    assert [next(iter(p)) for p in quant_quality.recipe_data("gptaq", s)["passes"]] == ["gptq", "quantize_activations"]
    weight_only = quant_quality.run_job({"method": "qa-gptaq", **common.parse_setting("nvfp4").job()},
                                        common.PEER_PYTHON, False)
    assert weight_only["status"] == "unavailable" and "w4a4-nvfp4" in weight_only["error"]


def test_block_rotated_methods_lead_with_hadamard_inputs_of_the_format_group():
    from benchmarks import quant_quality

    mx = common.parse_setting("w4a4-mxfp4")
    assert quant_quality.recipe_data("bh-qa-gptaq", mx)["passes"] == [
        {"hadamard_inputs": {"block": 32}}, {"quantize_activations": {"format": "mxfp4", "bits": 4}},
        {"gptq": {"scheme": mx.scheme(), "asymmetric": True}}]
    nv = quant_quality.recipe_data("bh-rtn", common.parse_setting("nvfp4"))["passes"]
    assert nv[0] == {"hadamard_inputs": {"block": 16}} and next(iter(nv[1])) == "rtn"
    for setting in ("w4g64", "w8a8-fp8"):  # integer grids and FP8 per channel have no input group to rotate within
        reason = quant_quality._not_run_reason("bh-rtn", common.parse_setting(setting))
        assert reason and setting in reason


def test_input_aware_awq_methods_search_with_the_setting_input_format():
    from benchmarks import quant_quality

    nv = common.parse_setting("w4a4-nvfp4")
    assert quant_quality.recipe_data("awqa-qa-gptaq", nv)["passes"] == [
        {"awq": {"scheme": nv.scheme(), "inputs": "nvfp4"}}, {"quantize_activations": {"format": "nvfp4", "bits": 4}},
        {"gptq": {"scheme": nv.scheme(), "asymmetric": True}}]
    assert quant_quality.recipe_data("awq-qa-gptaq", nv)["passes"][0] == {"awq": {"scheme": nv.scheme()}}
    # the MSE-scaled variant: GPTQ's scheme searches its group scales, AWQ's search keeps the plain ones
    mse = quant_quality.recipe_data("awqa-qa-gptaq-mse", nv)["passes"]
    assert mse[0] == {"awq": {"scheme": nv.scheme(), "inputs": "nvfp4"}}
    assert mse[2] == {"gptq": {"scheme": {**nv.scheme(), **quant_quality.MSE_GROW}, "asymmetric": True}}
    assert quant_quality.recipe_data("awqa-rtn", common.parse_setting("w8a8-fp8"))["passes"][0]["awq"]["inputs"] == "fp8"
    for setting in ("w4g64", "nvfp4"):  # weight-only: no input format to search with
        reason = quant_quality._not_run_reason("awqa-rtn", common.parse_setting(setting))
        assert reason and setting in reason


def test_w4g32_allowed_where_lossless_is_fine():
    assert common.parse_setting("w4g32", allow_lossless=True).group_size == 32


def _child(tmp_path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text("import json, sys\nargs = sys.argv\njob = json.loads(args[args.index('--job') + 1])\n"
                      "out = args[args.index('--result') + 1]\n" + body)
    return [sys.executable, str(script)]


def test_run_child_collects_the_record_and_rss(tmp_path):
    run = common.run_child(_child(tmp_path, "json.dump({'x': job['x'] * 2}, open(out, 'w'))\n"), {"x": 21})
    assert run.record == {"x": 42} and run.returncode == 0 and run.peak_rss_mb > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_childs_peak_is_its_own_not_the_rss_its_parent_had_when_it_started(tmp_path):
    """ru_maxrss of a fork + exec'd child starts at its parent's RSS; the recorded peak must not (it once
    reported a scale benchmark driver's 2.4 GB for every method run after it built a checkpoint)."""
    ballast = torch.ones(400 * 2**20 // 4)  # 400 MiB resident in this (the parent) process
    code = ("sys.path.insert(0, '.')\nfrom benchmarks import _common as c\n"
            "json.dump({'self_peak_rss_mb': c.peak_rss_mb()}, open(out, 'w'))\n")
    run = common.run_child(_child(tmp_path, code), {}, cwd=common.ROOT)
    assert float(ballast[-1]) == 1.0
    assert 0 < run.peak_rss_mb < 300, run.peak_rss_mb  # a bare python importing the helpers: well under 300 MiB
    assert common.peak_rss_mb() >= 400


@pytest.mark.parametrize("seconds", [1.0, None])
def test_a_job_with_stop_after_is_stopped_and_records_its_peak_so_far(tmp_path, seconds):
    """``stop_after_s``: a run that would not end in time writes status "stopped" and its peak so far; a run that
    ends first writes its own record and exits without waiting for the timer."""
    code = ("sys.path.insert(0, '.')\nimport argparse, time\nfrom benchmarks import _common as c\n"
            "def run(job):\n    time.sleep(job['sleep'])\n    return {'status': 'ok'}\n"
            "c.run_child_job(argparse.Namespace(child=True, job=json.dumps(job), result=out), run)\n")
    job = {"sleep": 60 if seconds else 0.1} | ({"stop_after_s": seconds} if seconds else {})
    run = common.run_child(_child(tmp_path, code), job, cwd=common.ROOT)
    assert run.returncode == 0 and run.wall_s < 30 and run.peak_rss_mb > 0
    if seconds:
        assert run.record["status"] == "stopped" and run.record["stopped_after_s"] == 1.0
    else:
        assert run.record["status"] == "ok"


@pytest.mark.parametrize("body,why", [("sys.exit(3)\n", "exit status 3"), ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "signal 9")])
def test_run_child_failure_is_reported(tmp_path, body, why):
    run = common.run_child(_child(tmp_path, body), {})
    assert run.record is None and why in run.failure()


def _cnn_data():
    pytest.importorskip("PIL")
    if importlib.util.find_spec("skimage") is None and not _has_dist("scikit-image"):
        pytest.skip("scikit-image photos not installed (pip install --no-deps scikit-image)")
    from benchmarks import _cnn_data

    return _cnn_data


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


def test_crops_are_deterministic_and_disjoint():
    data = _cnn_data()
    a = data.crop_sets(6, 4, seed=1, size=32)
    b = data.crop_sets(6, 9, seed=1, size=32)  # more calibration crops: same evaluation crops
    assert torch.equal(a.eval, b.eval) and a.eval_crops == b.eval_crops
    assert a.calib_crops == b.calib_crops[:4]
    assert not set(a.eval_crops) & set(b.calib_crops)
    assert a.eval.shape == (6, 3, 32, 32) and a.eval.dtype == torch.float32


class _SameConv(nn.Conv2d):
    """The EfficientNet port's shape: a conv applying its own ``static_padding`` child first."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return super().forward(self.static_padding(x))


def test_plain_convs_rewrite_is_exact():
    from benchmarks import cnn_adaround

    torch.manual_seed(0)
    model = nn.Sequential(_SameConv(3, 4, 3, stride=2), nn.ReLU(), _SameConv(4, 4, 3, groups=4)).eval()
    x = torch.randn(2, 3, 11, 11)
    with torch.no_grad():
        ref = model(x)
        out = cnn_adaround.plain_convs(model)(x)
    assert torch.equal(ref, out)
    assert all(type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))


def test_agreement_metrics():
    from benchmarks import cnn_adaround

    ref = torch.tensor([[5.0, 4, 3, 2, 1, 0], [5.0, 4, 3, 2, 1, 0]])
    got = cnn_adaround.agreement(ref, ref.clone())
    assert got["top1_agreement"] == 1.0 and got["top5_agreement"] == 1.0 and got["kl"] == 0.0
    out = torch.tensor([[4.0, 5, 3, 2, 1, 0], [-9.0, 4, 3, 2, 1, 5]])  # top-1 moved; in the top 5 once
    moved = cnn_adaround.agreement(ref, out)
    assert moved["top1_agreement"] == 0.0 and moved["top5_agreement"] == 0.5 and moved["kl"] > 0.1


def test_records_go_to_the_committed_results_and_smoke_runs_elsewhere(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    common.add_output_arg(parser, "quant_quality")
    parser.add_argument("--quick", action="store_true")
    assert common.output_path(parser.parse_args([]), "quant_quality") == common.ROOT / "benchmarks/results/quant_quality.jsonl"
    assert common.output_path(parser.parse_args(["--quick"]), "quant_quality") == common.ROOT / "out/bench/quant_quality-quick.jsonl"
    assert common.output_path(parser.parse_args(["--output", str(tmp_path / "x.jsonl")]), "q") == tmp_path / "x.jsonl"


def test_emit_stamps_commit_date_machine_and_load(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    common.emit({"bench": "t", "ppl": 1.0}, out)
    record = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == record
    assert len(record["commit"]) == 40 and isinstance(record["dirty"], bool)
    assert record["date"].endswith("Z") and record["machine"]["cores"] >= 1 and len(record["loadavg"]) == 3
    common.emit({"bench": "t", "commit": "given"}, out)  # a record's own fields win
    assert json.loads(out.read_text().splitlines()[1])["commit"] == "given"


def test_quick_alone_is_a_smoke_run_in_our_venv():
    """`python -m benchmarks.quant_quality --quick` runs our methods at one setting, no peer venv; without
    --quick the full table; a selection given is kept."""
    from benchmarks import quant_quality as qq

    parser = qq.build_parser()
    for argv, methods, settings in [(["--quick"], qq.QUICK_METHODS, qq.QUICK_SETTINGS),
                                    ([], qq.DEFAULT_METHODS, common.DEFAULT_SETTINGS),
                                    (["--quick", "--methods", "rtn", "--settings", "w3g64"], ("rtn",), ("w3g64",))]:
        args = parser.parse_args(argv)
        qq.default_selection(args)
        assert (args.methods.split(","), args.settings.split(",")) == (list(methods), list(settings))
    assert not set(qq.QUICK_METHODS) & (set(qq.PEER_METHODS) | set(qq.VENV_METHODS))
