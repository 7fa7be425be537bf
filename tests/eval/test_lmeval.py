"""lm-evaluation-harness adapter: a clear error without lm_eval, result conversion with a fake lm_eval (offline)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from compressor.cli import main
from compressor.eval.lmeval import lm_eval_fields, split_tasks
from compressor.eval.suite import SuiteConfig, evaluate_models

RESULTS = {
    "results": {
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.25, "acc_stderr,none": 0.0433, "acc_norm,none": 0.3125,
                      "acc_norm_stderr,none": 0.0464},
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": "N/A"},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.125, "exact_match,flexible-extract": 0.25},
    },
    "n-samples": {"hellaswag": {"original": 10042, "effective": 10}, "arc_easy": {"original": 2376, "effective": 10}},
    "versions": {"hellaswag": 1.0},
}


@pytest.fixture
def fake_lm_eval(monkeypatch):
    """A stand-in ``lm_eval`` package recording what the adapter passes to HFLM and simple_evaluate."""
    calls: dict = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer=None, batch_size=1):
            calls["hflm"] = {"pretrained": pretrained, "tokenizer": tokenizer, "batch_size": batch_size}

    def simple_evaluate(model, tasks, num_fewshot=None, limit=None, log_samples=True):
        calls.setdefault("evaluate", []).append({"model": model, "tasks": tasks, "limit": limit,
                                                 "log_samples": log_samples})
        return {**RESULTS, "results": {t: RESULTS["results"][t] for t in tasks}}

    pkg, models, hf = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"))
    pkg.simple_evaluate, pkg.models, models.huggingface, hf.HFLM = simple_evaluate, models, hf, HFLM
    for mod in (pkg, models, hf):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return calls


def test_missing_lm_eval_names_the_extra(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    text = str(tmp_path / "text.txt")
    args = ["eval", str(tiny_model_dir), "--dataset", text, "--ctx", "64", "--tasks", "hellaswag,arc_easy", "-q"]
    assert main(args) == 2
    assert "pip install 'compressor[lmeval]'" in caplog.text and "hellaswag,arc_easy" in caplog.text
    with pytest.raises(ImportError, match=r"compressor\[lmeval\]"):
        evaluate_models([tiny_model_dir], SuiteConfig(dataset=text, ctx=64, lm_eval_tasks=["hellaswag"]))


def test_cli_runs_lm_eval_on_the_loaded_model(tiny_model_dir, tmp_path, fake_lm_eval, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_model_dir), "--dataset", str(tmp_path / "text.txt"), "--ctx", "64",
                 "--tasks", "phrases,hellaswag,arc_easy", "--lm-eval-limit", "10", "--batch-size", "3",
                 "--decode-tokens", "0", "--json", str(tmp_path / "r.json"), "-q"]) == 0
    table = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    (call,) = fake_lm_eval["evaluate"]
    assert call["tasks"] == ["hellaswag", "arc_easy"] and call["limit"] == 10 and call["log_samples"] is False
    hflm = fake_lm_eval["hflm"]
    assert type(hflm["pretrained"]).__name__ == "LlamaForCausalLM" and hflm["batch_size"] == 3
    assert hflm["tokenizer"].get_vocab()["w5"] == 5
    assert row["hellaswag/acc"] == 0.25 and row["hellaswag/acc_norm"] == 0.3125 and row["arc_easy/acc"] == 0.5
    assert row["hellaswag/acc_norm_stderr"] == 0.0464 and "arc_easy/acc_stderr" not in row  # "N/A" dropped
    assert row["hellaswag/samples"] == 10 and row["task_items"] == 32  # the shipped phrases ran too
    header = table.splitlines()[0]
    assert "hellaswag/acc_norm" in header and "arc_easy/acc" in header and "stderr" not in header


def test_lm_eval_is_refused_under_a_multi_process_launch(tiny_model_dir, tmp_path, fake_lm_eval, monkeypatch):
    import compressor.eval.suite as suite

    monkeypatch.setattr(suite, "num_processes", lambda: 2)
    with pytest.raises(ValueError, match="one process"):
        evaluate_models([tiny_model_dir], SuiteConfig(dataset=str(tmp_path / "text.txt"), ctx=64,
                                                      lm_eval_tasks=["hellaswag"]))
    assert "evaluate" not in fake_lm_eval


def test_result_conversion():
    fields = lm_eval_fields(RESULTS)
    assert fields["gsm8k/exact_match[strict-match]"] == 0.125 and fields["gsm8k/exact_match[flexible-extract]"] == 0.25
    assert fields["arc_easy/samples"] == 10 and not any("alias" in k for k in fields)
    assert lm_eval_fields({}) == {}


def test_split_tasks(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text("{}\n")
    assert split_tasks(None) == (None, ())
    assert split_tasks("phrases") == ("phrases", ())
    assert split_tasks(f"hellaswag, {local}") == (str(local), ("hellaswag",))
    assert split_tasks("hellaswag,arc_easy") == (None, ("hellaswag", "arc_easy"))
    with pytest.raises(ValueError, match="merge them"):
        split_tasks(f"phrases,{local}")
    with pytest.raises(ValueError, match="empty entry"):
        split_tasks("hellaswag,,arc_easy")
    with pytest.raises(ValueError, match="lm_eval_tasks"):
        SuiteConfig(lm_eval_tasks="hellaswag")
    with pytest.raises(ValueError, match="lm_eval_limit"):
        SuiteConfig(lm_eval_limit=0)
