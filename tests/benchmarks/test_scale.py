"""benchmarks.scale: the random checkpoint it builds is the shape it says, and our two runs on it agree."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import load_benchmark

TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": False, "head_dim": 32}


def test_parameter_counts_match_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    scale = load_benchmark("scale")
    for shape in (TINY, {**TINY, "tie_word_embeddings": True}):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        assert sum(p.numel() for p in model.parameters()) == scale.parameters(shape)
    assert round(scale.parameters(scale.SHAPES["1b"]) / 1e9, 2) == 1.24
    assert round(scale.parameters(scale.SHAPES["8b"]) / 1e9, 2) == 8.03


@pytest.mark.slow  # two GPTQ runs with SOTU calibration sets: about a minute
def test_built_checkpoint_loads_and_streamed_export_equals_in_memory(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    scale = load_benchmark("scale")
    monkeypatch.setitem(scale.SHAPES, "tiny", TINY)
    monkeypatch.setattr(scale, "SHARD_BYTES", 4 * 2**20)  # several shards and an index
    monkeypatch.setattr(scale, "N_CALIB", 2)
    monkeypatch.setattr(scale, "CALIB_LEN", 64)
    path = scale.build_checkpoint("tiny", tmp_path)
    assert len(list(path.glob("model-*.safetensors"))) > 1 and scale.build_checkpoint("tiny", tmp_path) == path
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and sum(p.numel() for p in model.parameters()) == scale.parameters(TINY)
    for method in ("ours", "ours-stream"):
        result = scale.run({"method": method, "checkpoint": str(path), "output": str(tmp_path / method)})
        assert result["status"] == "ok", result
    files = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "ours-stream").glob("*.safetensors"))
    for name in files + ["config.json"]:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ours-stream" / name).read_bytes()
    result = scale.run({"method": "ours-stream-rotate", "checkpoint": str(path), "output": str(tmp_path / "rot")})
    assert result["status"] == "ok", result
    qcfg = json.loads((tmp_path / "rot" / "config.json").read_text())["quantization_config"]
    assert set(qcfg["transform_config"]["config_groups"]) == {"R4"}


def test_a_probe_keeps_the_first_blocks_of_a_shape():
    scale = load_benchmark("scale")
    probe = scale.shape_of("8b", 2)
    assert probe == {**scale.SHAPES["8b"], "num_hidden_layers": 2} and scale.SHAPES["8b"]["num_hidden_layers"] == 32
    assert round(scale.parameters(probe) / 1e9, 2) == 1.49  # 2 x 0.22B blocks + two 0.53B embedding matrices
    assert scale.shape_of("1b") == scale.SHAPES["1b"]
    for bad in (0, 33):
        with pytest.raises(ValueError, match="1 to 32 blocks"):
            scale.shape_of("8b", bad)
