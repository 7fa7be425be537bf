"""CLI end to end on a tiny saved model: compress, inspect, eval, and every bad input."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from compressor.cli import main


def _compress(src, out, *extra):
    return main(["compress", str(src), "--scheme", "w4a16", "--group-size", "32", "--output", str(out), "--quiet", *extra])


def test_compress_inspect_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compress(tiny_model_dir, out) == 0
    assert (out / "tokenizer.json").is_file() and (out / "recipe.yaml").is_file()
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_layers"] == 14
    # 4 bits + (32-bit fp32 scale + 4-bit zero point) per group of 32 (and ragged groups on K=80)
    assert 5.0 < info["bits_per_weight"] < 5.5
    assert info["loaders"][0] == "compressor.load_compressed"
    text = str(tmp_path / "text.txt")
    assert main(["eval", str(tiny_model_dir), str(out), "--dataset", text, "--ctx", "64", "--max-tokens", "0", "--json", "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["tokens"] for r in rows] == [9 * 63, 9 * 63]
    assert rows[0]["bits_per_weight"] == 32 and rows[1]["ppl"] > 0
    assert rows[0]["kl_to_base"] == 0.0 and rows[1]["kl_to_base"] > 0 and rows[1]["backend"] == "reference"


def test_recipe_file_and_overrides(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - rtn:\n      scheme: {bits: 4, group_size: 16, symmetric: true}\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--set", "rtn.scheme.bits=3", "-o", str(out), "-q"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (cfg["num_bits"], cfg["group_size"], cfg["symmetric"]) == (3, 16, True)


@pytest.mark.parametrize("preset,bits", [("w8a8", 8), ("w7a8", 7)])
def test_w8a8_presets_export_int_quantized_for_vllm(tiny_model_dir, tmp_path, capsys, preset, bits):
    """--scheme w8a8 / w7a8: symmetric per-channel weights and 8-bit per-token inputs, in vLLM's W8A8 layout."""
    out = tmp_path / "out"
    assert main(["compress", str(tiny_model_dir), "--scheme", preset, "-o", str(out), "-q"]) == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    assert qcfg["format"] == "int-quantized" and group["format"] == "int-quantized"
    assert (group["weights"]["num_bits"], group["weights"]["strategy"], group["weights"]["symmetric"]) == (8, "channel", True)
    assert group["input_activations"]["num_bits"] == 8 and group["input_activations"]["strategy"] == "token"
    assert (qcfg.get("compressor") or {}).get("weights", {}).get("group_0", {}).get("num_bits", 8) == bits
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["schemes"]["group_0"]["scheme"].startswith(f"W{bits} per-channel sym, inputs A8 per-token sym")
    assert any(r.startswith("vLLM (CPU: yes") for r in info["loaders"])


def test_missing_model(tmp_path, caplog):
    assert _compress(tmp_path / "nope", tmp_path / "out") == 2
    assert "does not exist" in caplog.text and not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    assert _compress(tiny_model_dir, out) == 2
    assert "--overwrite" in caplog.text
    assert _compress(tiny_model_dir, out, "--overwrite") == 0
    assert (out / "model.safetensors").is_file()


def test_unknown_recipe_key_and_bad_bits(tiny_model_dir, tmp_path, caplog):
    assert _compress(tiny_model_dir, tmp_path / "o", "--set", "rtn.scheme.bitz=3") == 2
    assert "did you mean 'bits'" in caplog.text
    assert _compress(tiny_model_dir, tmp_path / "o", "--set", "rtn.scheme.bits=9") == 2
    assert "bits=9" in caplog.text and not (tmp_path / "o").exists()


def test_nan_weight_is_reported_with_layer_name(tiny_model_dir, tmp_path, caplog):
    file = tiny_model_dir / "model.safetensors"
    sd = load_file(file)
    sd["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(sd, file, metadata={"format": "pt"})
    assert _compress(tiny_model_dir, tmp_path / "o") == 2
    assert "model.layers.1.mlp.up_proj" in caplog.text and "NaN" in caplog.text
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint(tiny_model_dir, tmp_path, caplog):
    file = tiny_model_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    assert _compress(tiny_model_dir, tmp_path / "o") == 2
    assert "truncated" in caplog.text


def test_eval_errors(tiny_model_dir, tmp_path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", str(tiny_model_dir), "--dataset", str(empty), "--ctx", "64", "--quiet"]) == 2
    assert "empty text" in caplog.text
    assert main(["eval", str(tiny_model_dir), "--dataset", str(tmp_path / "text.txt"), "--ctx", "4096", "--quiet"]) == 2
    assert "max_position_embeddings" in caplog.text


def test_compress_requires_a_scheme_or_recipe(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_model_dir), "--output", str(tmp_path / "o")])


def test_gptq_from_the_command_line_with_checkpoints(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = ["compress", str(tiny_model_dir), "--scheme", "w4a16", "--method", "gptq", "--group-size", "16",
            "--calibration", str(text), "--num-samples", "4", "--seq-len", "32", "--checkpoint-dir", str(ckpt),
            "-o", str(out), "-q"]
    assert main(args) == 0
    assert len(list(ckpt.glob("block_*.safetensors"))) == 2
    manifest = json.loads((out / "compressor_manifest.json").read_text())
    assert manifest["calibration"]["sequences"] == 4 and len(manifest["calibration"]["sha256"]) == 64
    assert main(args + ["--overwrite"]) == 0  # resumes from the checkpoints


def test_mixed_precision_recipe_then_inspect_bits(tiny_model_dir, tmp_path, capsys):
    """A recipe with allocate_bits before gptq, run from the CLI with checkpoints; inspect lists and plots the
    per-layer bits the allocation chose."""
    text, recipe = tmp_path / "text.txt", tmp_path / "mixed.yaml"
    recipe.write_text("passes:\n  - allocate_bits: {target_bpw: 4.5, candidates: [w2g16, w4g16, w8pc], probe: 2}\n"
                      "  - gptq: {scheme: {bits: 4, group_size: 16}}\n")
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--calibration", str(text), "--num-samples",
            "4", "--seq-len", "32", "--checkpoint-dir", str(ckpt), "-o", str(out), "-q"]
    assert main(args) == 0
    assert main(args + ["--overwrite"]) == 0  # resumes: the plan is made again, the blocks come from checkpoints
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["schemes"]) > 1 and len(set(info["layer_bits"].values())) > 1
    assert main(["inspect", str(out), "--bits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.strip().startswith("model.layers.0.mlp.down_proj") for line in lines)
    assert lines[-1].strip().startswith("mean over layers")
    pytest.importorskip("matplotlib")
    assert main(["inspect", str(out), "--bits", "--plot", str(tmp_path / "bits.png")]) == 0
    assert (tmp_path / "bits.png").stat().st_size > 0


def test_compress_stream_writes_the_same_export(tiny_model_dir, tmp_path):
    """--stream (blocks read and written one at a time) gives the in-memory run's files, GPTQ calibrated."""
    args = ["--method", "gptq", "--calibration", str(tmp_path / "text.txt"), "--num-samples", "4", "--seq-len", "32"]
    assert _compress(tiny_model_dir, tmp_path / "mem", *args) == 0
    assert _compress(tiny_model_dir, tmp_path / "stream", *args, "--stream") == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "stream" / name).read_bytes()
    assert json.loads((tmp_path / "stream" / "compressor_manifest.json").read_text())["streamed"] is True
