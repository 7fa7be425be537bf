"""benchmarks.dev_choice: the dev split's pick between two methods, as the shell drivers use it."""

from __future__ import annotations

import json

from benchmarks import dev_choice


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_newest_full_dev_records_decide_with_a_margin(tmp_path, capsys):
    rec = tmp_path / "q.jsonl"
    dev = {"split": "dev"}
    _write(rec, [
        {"setting": "nvfp4", "method": "rtn", "ppl": 30.0, "status": "ok", "protocol": dev},
        {"setting": "nvfp4", "method": "rtn-mse", "ppl": 20.0, "status": "ok", "protocol": dev},
        {"setting": "nvfp4", "method": "rtn-mse", "ppl": 29.9, "status": "ok", "protocol": dev},  # newer: counts
        {"setting": "nvfp4", "method": "rtn-mse", "ppl": 1.0, "status": "ok", "protocol": {"split": "test"}},
        {"setting": "nvfp4", "method": "rtn-mse", "ppl": 1.0, "status": "ok", "protocol": {**dev, "quick": True}},
        {"setting": "nvfp4", "method": "rtn-mse", "ppl": 1.0, "status": "error", "protocol": dev},
        {"setting": "mxfp4", "method": "rtn-mse", "ppl": 1.0, "status": "ok", "protocol": dev},
    ])
    assert dev_choice.dev_perplexities("nvfp4", rec) == {"rtn": 30.0, "rtn-mse": 29.9}
    dev_choice.main(["nvfp4", "rtn", "rtn-mse", "--records", str(rec)])
    dev_choice.main(["nvfp4", "rtn", "rtn-mse", "--margin", "0.01", "--pick", "gptq,gptq-mse", "--records", str(rec)])
    dev_choice.main(["mxfp4", "rtn", "rtn-mse", "--records", str(rec)])  # the base has no record: alt wins
    dev_choice.main(["fp8", "rtn", "rtn-mse", "--records", str(rec)])  # neither: the base
    assert capsys.readouterr().out.split() == ["rtn-mse", "gptq", "rtn-mse", "rtn"]
