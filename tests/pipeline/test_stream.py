"""Streamed compression (compressor.export.stream): blocks read from the checkpoint when their turn comes,
written into the export once compressed; the export equals the in-memory run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import tiny_llama, tiny_tokenizer

from compressor import Recipe, compress, load_compressed
from compressor.export.stream import StreamedExport, load_skeleton

CALIB = torch.randint(0, 95, (6, 16), generator=torch.Generator().manual_seed(1))
GPTQ = {"gptq": {"scheme": {"bits": 4, "group_size": 32}}}
GPTAQ = {"gptq": {"scheme": {"bits": 4, "group_size": 32}, "asymmetric": True}}
RTN = {"rtn": {"scheme": {"bits": 4, "group_size": 32}}}
RECIPES = {
    "gptq": [GPTQ],
    "gptaq": [GPTAQ],
    "prune+gptq": [{"prune": {"method": "wanda", "sparsity": 0.5}}, GPTQ],
    "rtn": [RTN],
    "prune(owl)+gptq": [{"prune": {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1}}, GPTQ],
    "prune(dp,relative)+rtn": [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "allocation": "dp",
                                          "dp_distortion": "relative"}}, RTN],
    "rtn+lm_head": [{"rtn": {"scheme": {"bits": 8, "group_size": -1}, "ignore": []}}],
    "rotate+gptq": [{"rotate": {}}, GPTQ],
    "rotate(r3,online_o)+rtn": [{"rotate": {"r3": True, "online_o": True}}, RTN],
    "rotate(random)+gptaq": [{"rotate": {"r1": "random"}}, GPTAQ],
    "awq+rtn": [{"awq": {"scheme": {"bits": 4, "group_size": 32}, "grid": 4}}, RTN],
    "adaround(block)": [{"adaround": {"scheme": {"bits": 4, "group_size": 32}, "iters": 4, "granularity": "block"}}],
    "adaround(layer,asymmetric)": [{"adaround": {"scheme": {"bits": 4, "group_size": 32}, "iters": 4,
                                                 "asymmetric": True}}],
    "gptq+distill_blocks": [GPTQ, {"distill_blocks": {"iters": 3, "batch_size": 2}}],
    "rotate+prune(owl)+gptq": [{"rotate": {}}, {"prune": {"method": "wanda", "sparsity": 0.5, "allocation": "owl",
                                                         "owl_lambda": 0.1}}, GPTQ],
    "rotate(r3,online_o)+prune(dp,relative)+rtn": [{"rotate": {"r3": True, "online_o": True}},
                                                   {"prune": {"method": "sparsegpt", "sparsity": 0.5,
                                                              "allocation": "dp", "dp_distortion": "relative"}}, RTN],
    "rotate+awq+gptq": [{"rotate": {}}, {"awq": {"scheme": {"bits": 4, "group_size": 32}, "grid": 4}}, GPTQ],
    "hadamard_inputs+gptq": [{"hadamard_inputs": {"block": 16}}, GPTQ],
    "hadamard_inputs+prune(owl)+rtn": [{"hadamard_inputs": {"block": 16}},
                                       {"prune": {"method": "wanda", "sparsity": 0.5, "allocation": "owl",
                                                  "owl_lambda": 0.1}}, RTN],
}


def _checkpoint(tmp_path: Path, layers: int = 3, tie: bool = True, dtype=torch.float32) -> Path:
    src = tmp_path / "src"
    model = tiny_llama(layers=layers, tie=tie).to(dtype)
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_streamed_export_is_the_in_memory_export_byte_for_byte(tmp_path, name):
    src = _checkpoint(tmp_path)
    recipe = Recipe.from_dict({"passes": RECIPES[name]})
    in_memory = compress(src, recipe, calibration=CALIB, output=tmp_path / "mem", quiet=True)
    model = compress(src, recipe, calibration=CALIB, output=tmp_path / "stream", quiet=True, stream=True)
    assert all(p.is_meta for p in model.model.layers.parameters())  # the blocks were written and freed
    assert getattr(model, "rotation_info", None) == getattr(in_memory, "rotation_info", None)
    mem, streamed = _files(tmp_path / "mem"), _files(tmp_path / "stream")
    assert set(mem) == set(streamed)
    for file in mem:
        if file == "compressor_manifest.json":  # provenance: the streamed run says so
            a, b = json.loads(mem[file]), json.loads(streamed[file])
            assert b.pop("streamed") is True and a == b
        else:
            assert mem[file] == streamed[file], file
    ref = load_compressed(tmp_path / "mem")
    ids = CALIB[:2]
    assert torch.equal(load_compressed(tmp_path / "stream")(ids).logits, ref(ids).logits)


def test_streamed_export_splits_into_shards_with_an_index(tmp_path):
    """Small shards: several files and an index naming every tensor; the tensors are the in-memory run's."""
    src = _checkpoint(tmp_path, layers=4, tie=False)
    recipe = Recipe.from_dict({"passes": RECIPES["gptq"]})
    compress(src, recipe, calibration=CALIB, output=tmp_path / "mem", quiet=True)
    model, reader = load_skeleton(src)
    streamed = StreamedExport(model, reader, tmp_path / "stream", max_shard_bytes=20_000)
    from compressor.export.compressed_tensors import save_compressed
    from compressor.pipeline.schedule import run_passes
    from compressor.pipeline.sequential import PipelineConfig

    try:
        run_passes(model, recipe.build(), calibration_ids=lambda names: CALIB, config=PipelineConfig(quiet=True),
                   stream=streamed)
        save_compressed(model, tmp_path / "stream", recipe=recipe, stream=streamed)
    finally:
        streamed.close()
    shards = sorted((tmp_path / "stream").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    got, want = _tensors(tmp_path / "stream"), _tensors(tmp_path / "mem")
    assert set(index["weight_map"]) == set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list(tmp_path.glob(".stream.stream-*"))  # the staging directory is gone


@pytest.mark.parametrize("tie", [True, False])
def test_parameters_outside_the_blocks_are_freed_while_the_blocks_run(tmp_path, monkeypatch, tie):
    """Embeddings, final norm and lm_head are on meta from block 0 to the last block (tied ones stay one
    parameter), and are read back for the export, which equals the in-memory run's."""
    src = _checkpoint(tmp_path, tie=tie)
    recipe = Recipe.from_dict({"passes": RECIPES["gptq"]})
    seen = []
    load = StreamedExport.load

    def spy(self, index, prefix, block):
        m = self.model
        seen.append((m.model.embed_tokens.weight.is_meta, m.lm_head.weight.is_meta, m.model.norm.weight.is_meta,
                     m.lm_head.weight is m.model.embed_tokens.weight))
        load(self, index, prefix, block)

    monkeypatch.setattr(StreamedExport, "load", spy)
    model = compress(src, recipe, calibration=CALIB, output=tmp_path / "stream", quiet=True, stream=True)
    assert seen == [(True, True, True, tie)] * 3
    assert not model.model.embed_tokens.weight.is_meta and (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    compress(src, recipe, calibration=CALIB, output=tmp_path / "mem", quiet=True)
    got, want = _tensors(tmp_path / "stream"), _tensors(tmp_path / "mem")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_streamed_rotation_holds_one_block_at_a_time(tmp_path, monkeypatch):
    """rotate in a streamed run: the embedding and head are rotated before block 0 is read, each block right
    after it is read, while every other block is on meta; a rotated block keeps its online transforms
    (R4 / R3 buffers) after it is written and freed, for the export's transform_config."""
    from compressor.algorithms.transforms.rotate import Rotation
    from compressor.runtime.online import OnlineHadamard

    src = _checkpoint(tmp_path, layers=3)
    seen = []
    block = Rotation.block

    def spy(self, index):
        layers = self.model.model.layers
        seen.append((index, [all(p.is_meta for p in layers[j].parameters()) for j in range(len(layers))],
                     self.model.model.embed_tokens.weight.is_meta))
        block(self, index)

    monkeypatch.setattr(Rotation, "block", spy)
    recipe = Recipe.from_dict({"passes": [{"rotate": {"r3": True}}, GPTQ]})
    model = compress(src, recipe, calibration=CALIB, output=tmp_path / "out", quiet=True, stream=True)
    assert seen == [(i, [j != i for j in range(3)], True) for i in range(3)]
    hadamards = [m for m in model.model.layers.modules() if isinstance(m, OnlineHadamard)]
    assert len(hadamards) == 6 and not any(m.base is not None and m.base.is_meta for m in hadamards)
    assert model.rotation_info["online"] == 6 and model.rotation_info["untied_embeddings"] is True
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert set(qcfg["transform_config"]["config_groups"]) == {"R3", "R4"}


def test_skeleton_holds_only_what_is_outside_the_blocks(tmp_path):
    src = _checkpoint(tmp_path, dtype=torch.bfloat16)
    model, _ = load_skeleton(src)
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and not model.model.embed_tokens.weight.is_meta
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, read once
    assert not model.model.rotary_emb.inv_freq.is_meta


@pytest.mark.parametrize("passes, words", [
    ([{"ostquant": {}}, GPTQ], "ostquant"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5, "allocation": "lamp"}}, GPTQ], "prune cannot run streamed"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5, "allocation": "dp"}}, GPTQ], "prune cannot run streamed"),
    ([{"prune": {"method": "wanda", "sparsity": 0.5}}], "must quantize"),
    ([GPTQ, {"distill": {"steps": 1}}], "distill_blocks"),
])
def test_a_recipe_that_cannot_stream_is_refused_before_any_work(tmp_path, passes, words):
    src = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match=words) as err:
        compress(src, Recipe.from_dict({"passes": passes}), calibration=CALIB, output=tmp_path / "out", stream=True)
    assert "without" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_stream_needs_a_path_and_an_output(tmp_path):
    recipe = Recipe.from_dict({"passes": [GPTQ]})
    with pytest.raises(ValueError, match="directory or Hub repo id"):
        compress(tiny_llama(), recipe, calibration=CALIB, output=tmp_path / "out", stream=True)
    with pytest.raises(ValueError, match="give output"):
        compress(_checkpoint(tmp_path), recipe, calibration=CALIB, stream=True)


def test_a_failed_streamed_run_leaves_no_output_and_no_staging(tmp_path):
    src = _checkpoint(tmp_path)
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())  # intact
    from safetensors.torch import save_file

    tensors = load_file(str(src / "model.safetensors"))
    tensors.pop("model.layers.2.mlp.down_proj.weight")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.2.mlp.down_proj.weight is not in the checkpoint"):
        compress(src, Recipe.from_dict({"passes": [GPTQ]}), calibration=CALIB, output=tmp_path / "out", stream=True,
                 quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("name", ["gptq", "rotate+gptq"])
def test_streamed_run_resumes_from_block_checkpoints(tmp_path, name):
    """With checkpoint_dir, a second streamed run takes every block from the checkpoints: the same export
    (a rotated block is rotated again as it is read, then its checkpoint replaces its weights)."""
    from compressor.pipeline.sequential import PipelineConfig

    src = _checkpoint(tmp_path)
    recipe = Recipe.from_dict({"passes": RECIPES[name]})
    pipeline = PipelineConfig(checkpoint_dir=tmp_path / "ckpt", quiet=True)
    compress(src, recipe, calibration=CALIB, output=tmp_path / "a", pipeline=pipeline, stream=True)
    assert len(list((tmp_path / "ckpt").rglob("*.safetensors"))) >= 3
    compress(src, recipe, calibration=CALIB, output=tmp_path / "b", pipeline=pipeline, stream=True)
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_our_safetensors_writer_writes_what_save_file_writes(tmp_path):
    from safetensors.torch import save_file

    from compressor.export.stream import _Shard

    g = torch.Generator().manual_seed(0)
    tensors = {"z.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a.scale": torch.randn(3, 1, generator=g),
               "m.packed": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32, generator=g),
               "m.shape": torch.tensor([4, 16]), "f8": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn),
               "u": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g), "mask": torch.rand(3, generator=g) > 0.5,
               "empty": torch.zeros(0, 4), "t": torch.randn(6, 4, generator=g).t()}  # non-contiguous
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    shard = _Shard(tmp_path / "b.safetensors")  # the streamed export's writer: tensor by tensor, then assembled
    for key, t in tensors.items():
        shard.add(key, t)
    shard.close({"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_a_shard_written_as_its_tensors_arrive_is_what_save_file_writes(tmp_path, monkeypatch, kernel_copy):
    """The streamed export's shard: tensors appended to a spool file one by one, the safetensors file assembled
    from it on close (in the kernel, or through the buffered fallback) equals save_file's, and the spool is gone."""
    from safetensors.torch import save_file

    from compressor.export import stream

    if not kernel_copy:
        def refuse(*args):
            raise OSError(95, "not supported")

        monkeypatch.setattr(stream.os, "copy_file_range", refuse, raising=False)
    g = torch.Generator().manual_seed(2)
    tensors = {"z.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16), "a.scale": torch.randn(3, 1, generator=g),
               "m.packed": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32, generator=g),
               "f8": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 4),
               "mask": torch.rand(5, generator=g) > 0.5, "t": torch.randn(6, 4, generator=g).t()}
    shard = stream._Shard(tmp_path / "b.safetensors")
    for key, t in tensors.items():
        shard.add(key, t)
    shard.close({"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


def test_checkpoint_reader_reads_every_dtype_as_stored(tmp_path):
    from safetensors.torch import save_file

    from compressor.export.stream import CheckpointReader

    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(3, 5, generator=g).to(torch.bfloat16), "s": torch.randn(3, generator=g),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.tensor([True, False]),
               "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn), "one": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    for key, t in tensors.items():
        got = reader.get(key)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert reader.first_float_dtype() == torch.float32  # the first float tensor in the file: F32 data come first
    assert "w" in reader and "x" not in reader


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_a_streamed_rotation_of_other_families_is_the_in_memory_one(tmp_path, family):
    """Gemma's R1 at the readers' inputs (sandwich norms, 1 + w norms) and Phi-3's fused qkv / gate_up stream
    to the same export as in memory."""
    from tests.transforms.test_rotate_families import _model

    src = tmp_path / "src"
    _model(family).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    recipe = Recipe.from_dict({"passes": [{"rotate": {}}, GPTQ]})
    compress(src, recipe, calibration=CALIB[:4], output=tmp_path / "mem", quiet=True)
    compress(src, recipe, calibration=CALIB[:4], output=tmp_path / "stream", quiet=True, stream=True)
    mem, streamed = _files(tmp_path / "mem"), _files(tmp_path / "stream")
    assert set(mem) == set(streamed)
    for file in set(mem) - {"compressor_manifest.json"}:
        assert mem[file] == streamed[file], file


@pytest.mark.parametrize(("family", "recipe"), [
    ("qwen3_moe", "gptq"), ("qwen3_moe", "rotate+gptq"), ("mixtral", "gptq"), ("mixtral", "rotate+gptq"),
    ("olmoe", "gptq"), ("glm4_moe", "gptq"), ("deepseek_v3", "gptq")])
def test_a_streamed_moe_checkpoint_is_the_in_memory_export(tmp_path, family, recipe):
    """MoE checkpoints store one linear per expert (Mixtral under ``block_sparse_moe.experts.{e}.w1/w3/w2``); the
    streamed reader assembles transformers' fused (E, 2I, H) / (E, H, I) experts from them, and the export
    is the in-memory one's, byte for byte."""
    from tests.test_families import MOE, MOE_FAMILIES, tiny

    src = tmp_path / "src"
    tiny(family, **MOE, **MOE_FAMILIES[family]).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    stored = set(_tensors(src))
    word = "block_sparse_moe.experts.1.w3" if family == "mixtral" else "mlp.experts.1.up_proj"
    assert f"model.layers.0.{word}.weight" in stored and not any("gate_up_proj" in k for k in stored)
    r = Recipe.from_dict({"passes": RECIPES[recipe]})
    compress(src, r, calibration=CALIB[:4], output=tmp_path / "mem", quiet=True)
    model = compress(src, r, calibration=CALIB[:4], output=tmp_path / "stream", quiet=True, stream=True)
    assert all(p.is_meta for p in model.model.layers.parameters())
    mem, streamed = _files(tmp_path / "mem"), _files(tmp_path / "stream")
    assert set(mem) == set(streamed)
    for file in set(mem) - {"compressor_manifest.json"}:
        assert mem[file] == streamed[file], file


def test_a_checkpoint_missing_an_expert_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file
    from tests.test_families import MOE, tiny

    src = tmp_path / "src"
    tiny("qwen3_moe", **MOE).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    tensors = _tensors(src)
    del tensors["model.layers.1.mlp.experts.2.down_proj.weight"]
    for f in src.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight is not in the checkpoint.*1 of down_proj's 4"):
        compress(src, Recipe.from_dict({"passes": [GPTQ]}), calibration=CALIB[:4], output=tmp_path / "o",
                 quiet=True, stream=True)
    assert not (tmp_path / "o").exists()


def test_a_streamed_owl_sweep_reads_every_block_twice_and_allocates_unevenly(tmp_path, monkeypatch):
    """OWL's sweep over the dense model reads each block from the checkpoint and frees it (writing nothing);
    the run then reads it again to prune and quantize it. The blocks get different sparsities."""
    src = _checkpoint(tmp_path)
    reads = []
    load = StreamedExport.load
    monkeypatch.setattr(StreamedExport, "load", lambda self, i, prefix, block: (reads.append(i), load(self, i, prefix, block)))
    recipe = Recipe.from_dict({"passes": RECIPES["prune(owl)+gptq"]})
    model = compress(src, recipe, calibration=CALIB, output=tmp_path / "out", quiet=True, stream=True)
    assert reads == [0, 1, 2, 0, 1, 2]
    assert all(p.is_meta for p in model.model.layers.parameters())
    # the plan is the in-memory run's (the exports are byte-identical: test above), and it is not uniform
    in_memory = compress(src, recipe, calibration=CALIB, quiet=True)
    zeros = [sum(int((m.weight == 0).sum()) for m in block.modules() if isinstance(m, torch.nn.Linear))
             for block in in_memory.model.layers]
    assert len(set(zeros)) == 3, zeros
