"""`accelerate launch` with two CPU processes (gloo) scores the same as one process, window by window."""

from __future__ import annotations

import json

import pytest
from tests.helpers import launch_two_cpu_processes
from safetensors.torch import load_file

from compressor.cli import main
from compressor.eval.distributed import gather_in_order, is_main_process, num_processes, split_for_process


def _task_file(path):
    rows = [{"context": f"w{i} w{i + 1}", "choices": [f" w{i + 2}", f" w{i + 7} w{i + 3}"], "gold": i % 2}
            for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_single_process_helpers_are_the_identity():
    assert num_processes() == 1 and is_main_process()
    assert split_for_process(range(5)) == [0, 1, 2, 3, 4] and gather_in_order([3, 1]) == [3, 1]


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    export = tmp_path / "w4g32"
    assert main(["compress", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "-o", str(export),
                 "-q"]) == 0
    # 9 windows of 64 over 2 processes: shares of 5 and 4, batches of 2 (a ragged last batch on each)
    args = ["eval", str(tiny_model_dir), str(export), "--dataset", str(tmp_path / "text.txt"), "--ctx", "64",
            "--max-tokens", "0", "--batch-size", "2", "--tasks", str(_task_file(tmp_path / "tasks.jsonl")),
            "--decode-tokens", "0", "-q"]
    assert main([*args, "--json", str(tmp_path / "one.json"), "--dump-nll", str(tmp_path / "nll1")]) == 0

    proc = launch_two_cpu_processes([*args, "--json", str(tmp_path / "two.json"), "--dump-nll", str(tmp_path / "nll2")],
                                    tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["settings"]["processes"] == 1 and two["settings"]["processes"] == 2
    for a, b in zip(one["rows"], two["rows"], strict=True):
        assert (b["windows"], b["tokens"]) == (a["windows"], a["tokens"]) == (9, 9 * 63)
        assert round(b["ppl"], 4) == round(a["ppl"], 4) and b["ppl"] == pytest.approx(a["ppl"], rel=1e-6)
        assert b["kl_to_base"] == pytest.approx(a["kl_to_base"], rel=1e-4, abs=1e-9)
        assert (b["task_acc"], b["task_acc_norm"], b["task_items"]) == (a["task_acc"], a["task_acc_norm"], 5)
    for name in ("tiny", "w4g32"):  # per-token NLL gathered back in window order
        d1, d2 = (load_file(str(tmp_path / d / f"{name}.safetensors")) for d in ("nll1", "nll2"))
        assert (d1["target_ids"] == d2["target_ids"]).all()
        assert (d1["nll"] - d2["nll"]).abs().max() < 1e-4
    assert proc.stdout.count("| label") == 1  # only rank 0 prints the table
