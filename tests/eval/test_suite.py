"""`compressor eval BASE EXPORT` end to end on a tiny model and its RTN export; bad input."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from compressor.api import evaluate
from compressor.cli import main
from compressor.eval.suite import SuiteConfig, evaluate_models


def _task_file(path):
    rows = [{"context": f"w{i} w{i + 1}", "choices": [f" w{i + 2}", f" w{i + 7} w{i + 3}"], "gold": i % 2}
            for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def export_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "w4g32"
    assert main(["compress", str(tiny_model_dir), "--scheme", "w4a16", "--group-size", "32", "-o", str(out), "-q"]) == 0
    return out


def test_cli_compares_base_and_export(tiny_model_dir, export_dir, tmp_path, capsys):
    text, tasks = str(tmp_path / "text.txt"), _task_file(tmp_path / "tasks.jsonl")
    args = ["eval", str(tiny_model_dir), str(export_dir), "--dataset", text, "--ctx", "64", "--max-tokens", "0",
            "--tasks", str(tasks), "--decode-tokens", "3", "--prompt-tokens", "8", "--quiet",
            "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"), "--dump-nll", str(tmp_path / "nll")]
    if _has_matplotlib():
        args += ["--plot", str(tmp_path / "r.png")]
    capsys.readouterr()
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| label") and "w4g32" in table and "tiny" in table
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    base, exp = rows
    assert base["role"] == "base" and base["kl_to_base"] == 0.0 and base["backend"] == "dense"
    assert exp["role"] == "compared" and 0 < exp["kl_to_base"] < 0.5 and 0 < exp["top1_agree"] <= 1
    assert exp["backend"] == "reference" and base["bits_per_weight"] == 32 and 5.0 < exp["bits_per_weight"] < 5.5
    assert exp["size_mb"] < base["size_mb"]
    assert base["tokens"] == exp["tokens"] == 9 * 63
    ref = evaluate(tiny_model_dir, dataset=text, ctx=64, max_tokens=None, quiet=True)
    assert base["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    for r in rows:
        assert r["task_items"] == 6 and 0 <= r["task_acc"] <= 1 and 0 <= r["task_acc_norm"] <= 1
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    md = (tmp_path / "r.md").read_text()
    assert "| w4g32" in md and "dataset" in md
    dump = load_file(str(tmp_path / "nll" / "w4g32.safetensors"))
    assert dump["nll"].shape == dump["kl"].shape == dump["target_ids"].shape == (9 * 63,)
    assert dump["nll"].double().sum().item() == pytest.approx(exp["nll"], rel=1e-5)
    assert set(load_file(str(tmp_path / "nll" / "tiny.safetensors"))) == {"nll", "target_ids"}
    if _has_matplotlib():
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_single_model_json_lines(tiny_model_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_model_dir), "--dataset", str(tmp_path / "text.txt"), "--ctx", "64",
                 "--decode-tokens", "0", "--json", "--quiet"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["kl_to_base"] == 0.0 and "decode_tok_s" not in row and "task_acc" not in row


def test_api_rows_in_order(tiny_model_dir, export_dir, tmp_path):
    seen = []
    config = SuiteConfig(dataset=str(tmp_path / "text.txt"), ctx=32, max_tokens=256, decode_tokens=0, quiet=True)
    rows = evaluate_models([tiny_model_dir, export_dir, export_dir], config, on_row=seen.append)
    assert seen == rows and [r["role"] for r in rows] == ["base", "compared", "compared"]
    assert rows[1]["label"] != rows[2]["label"]  # same directory name twice: full paths tell them apart
    assert rows[1]["ppl"] == rows[2]["ppl"] and rows[1]["kl_to_base"] == rows[2]["kl_to_base"]


def test_bad_input(tiny_model_dir, export_dir, tmp_path, caplog):
    text = str(tmp_path / "text.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "w1", "choices": [" w2", " w3"], "gold": 0}\n'
                   '{"context": "w1", "choices": [" w2", " w3"], "label": 0}\n')
    assert main(["eval", str(tiny_model_dir), "--dataset", text, "--ctx", "64", "--tasks", str(bad), "-q"]) == 2
    assert "line 2 has unknown field 'label'" in caplog.text
    caplog.clear()
    assert main(["eval", str(tiny_model_dir), str(export_dir), "--dataset", text, "--ctx", "4096", "-q"]) == 2
    assert "max_position_embeddings=128" in caplog.text and "--ctx 128" in caplog.text
    caplog.clear()
    (tmp_path / "blank.txt").write_text("  \n")
    assert main(["eval", str(tiny_model_dir), "--dataset", str(tmp_path / "blank.txt"), "--ctx", "64", "-q"]) == 2
    assert "empty text" in caplog.text
    with pytest.raises(ValueError, match="decode_tokens"):
        SuiteConfig(decode_tokens=-1)
    with pytest.raises(FileNotFoundError):
        evaluate_models([tmp_path / "missing"], SuiteConfig(dataset=text))


def _has_matplotlib() -> bool:
    from compressor.eval.report import matplotlib_missing

    return matplotlib_missing() is None


def test_models_with_another_tokenizer_are_refused(tiny_model_dir, export_dir, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(export_dir, other)
    tok = Tokenizer(models.WordLevel({f"x{i}": i for i in range(95)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(other)
    with pytest.raises(ValueError, match="different tokenizer"):
        evaluate_models([tiny_model_dir, other], SuiteConfig(dataset=str(tmp_path / "text.txt"), ctx=64))
