"""Compression at real model sizes: wall time and peak host memory against parameters, ours beside llm-compressor.

Builds random-weight Llama checkpoints at real shapes locally (no download), in bfloat16, written tensor by
tensor into safetensors shards so that building one never needs the model in memory:

* ``1b``: Llama-3.2-1B's shape (2048 hidden, 8192 MLP, 16 blocks, 32 / 8 heads, 128256 vocabulary, tied), 1.24B;
* ``8b``: Llama-3.1-8B's (4096, 14336, 32 blocks, 32 / 8 heads, 128256, untied), 8.03B, a 16 GB checkpoint;
* ``14b``: a Llama with Qwen2.5-14B's widths (5120, 13824, 48 blocks, 40 / 8 heads, 152064, untied), 14.8B.

Each method compresses a checkpoint with GPTQ, W4 symmetric group 128 (llm-compressor's ``W4A16``
preset), every linear but ``lm_head``, on the same 16 x 512 calibration tokens (SOTU 1790-1999, SmolLM2's
tokenizer, whose ids all lie inside the vocabulary), and writes its export, all in a child process:

* ``ours``: ``compressor.compress`` with the model in memory;
* ``ours-stream``: ``compress(..., stream=True)``: blocks read from the shards and written out one by one;
* ``ours-stream-rotate``: the same with a ``rotate`` pass (QuaRot's R1, R2, R4) before GPTQ, each block rotated as
  it is read: what streaming a whole-model transform costs in time and memory;
* ``llmc-gptq``: llm-compressor's ``oneshot`` with ``GPTQModifier(scheme="W4A16")``, sequential pipeline,
  then ``save_pretrained(save_compressed=True)``; in the peer venv (``benchmarks/setup_peers.sh``).

A record holds the child's wall time (start to exit: loading, calibration, compression, export), its peak
RSS (the child's own high-water mark, ``VmHWM``: see :func:`benchmarks._common.peak_rss_mb`), seconds per billion
parameters, and the export's size.
Perplexity means nothing on random weights and is not measured. Run on an otherwise idle machine::

    python -m benchmarks.scale --shapes 1b --methods ours-stream,ours,llmc-gptq

A run too long to finish here can be stopped part way (``--stop-after SECONDS``): its record says
``"status": "stopped"`` and its peak RSS is the peak so far, a lower bound on the whole run's (llm-compressor's
grew block by block at the 8B shape: a stopped run's bound is only that).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.scale")

BENCH = "scale"
WORK = common.ROOT / "out" / "scale"
N_CALIB, CALIB_LEN = 16, 512
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "head_dim": 64},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "head_dim": 128},
    "14b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False, "head_dim": 128},
}
METHODS = ("ours", "ours-stream", "ours-stream-rotate", "llmc-gptq")
SHARD_BYTES = 2 * 2**30


def parameters(shape: dict[str, Any]) -> int:
    """Parameter count of a Llama of ``shape`` (tied embeddings counted once)."""
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    d = shape["head_dim"]
    attn = h * d * (shape["num_attention_heads"] * 2 + shape["num_key_value_heads"] * 2)
    block = attn + 3 * h * i + 2 * h
    return n * block + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


def _tensors(shape: dict[str, Any]):
    """``(name, shape, kind)`` of every tensor of the checkpoint, in order (kind: "linear", "norm", "embedding")."""
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (shape["vocab_size"], h), "embedding"
    for b in range(shape["num_hidden_layers"]):
        p = f"model.layers.{b}"
        yield f"{p}.input_layernorm.weight", (h,), "norm"
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield f"{p}.self_attn.{name}.weight", (rows, h), "linear"
        yield f"{p}.self_attn.o_proj.weight", (h, q), "linear"
        yield f"{p}.post_attention_layernorm.weight", (h,), "norm"
        yield f"{p}.mlp.gate_proj.weight", (i, h), "linear"
        yield f"{p}.mlp.up_proj.weight", (i, h), "linear"
        yield f"{p}.mlp.down_proj.weight", (h, i), "linear"
    yield "model.norm.weight", (h,), "norm"
    if not shape["tie_word_embeddings"]:
        yield "lm_head.weight", (shape["vocab_size"], h), "embedding"


def shape_of(name: str, blocks: int | None = None) -> dict[str, Any]:
    """The config fields of shape ``name``, with only its first ``blocks`` decoder blocks when given."""
    shape = dict(SHAPES[name])
    if blocks is not None:
        if not 0 < blocks <= shape["num_hidden_layers"]:
            raise ValueError(f"--blocks {blocks}: the {name} shape has 1 to {shape['num_hidden_layers']} blocks")
        shape["num_hidden_layers"] = blocks
    return shape


def _depth_suffix(blocks: int | None) -> str:
    """The name suffix of a checkpoint or export cut to its first ``blocks`` blocks ("" for the full depth)."""
    return "" if blocks is None else f"-{blocks}blocks"


def build_checkpoint(name: str, root: Path = WORK, blocks: int | None = None) -> Path:
    """The random-weight bfloat16 checkpoint of shape ``name`` under ``root`` (built once; reused after).

    Linear weights are N(0, 1/fan_in) (unit-variance outputs), embeddings N(0, 0.02²), norms 1, seeded per
    tensor. Memory: one tensor and one shard buffer (``SHARD_BYTES``) at a time. The tokenizer is SmolLM2's.
    With ``blocks``, only the first ``blocks`` decoder blocks (a memory probe: a streamed run's peak does not
    depend on depth, so two blocks of the 8B shape show its peak in a fraction of the time).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from compressor.fixtures import smollm2_dir

    path = root / f"llama-{name}-random{_depth_suffix(blocks)}"
    if (path / ".complete").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shape = shape_of(name, blocks)
    config = LlamaConfig(**shape, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2)
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(path)
    buffer: dict[str, torch.Tensor] = {}
    size, weight_map, total, files = 0, {}, 0, []
    started = time.perf_counter()

    def flush():
        nonlocal buffer, size
        file = path / f"part-{len(files):05d}.safetensors"
        save_file(buffer, str(file), metadata={"format": "pt"})
        files.append((file, list(buffer)))
        buffer, size = {}, 0

    for k, (key, dims, kind) in enumerate(_tensors(shape)):
        gen = torch.Generator().manual_seed(k)
        if kind == "norm":
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            std = 0.02 if kind == "embedding" else dims[1] ** -0.5
            t = (torch.randn(dims, generator=gen) * std).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if buffer and size + nbytes > SHARD_BYTES:
            flush()
        buffer[key] = t
        size += nbytes
        total += nbytes
    flush()
    for n, (file, keys) in enumerate(files, 1):
        final = path / f"model-{n:05d}-of-{len(files):05d}.safetensors"
        file.rename(final)
        weight_map.update({k: final.name for k in keys})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    (path / ".complete").write_text("")
    log.info("built %s: %.2fB parameters, %.1f GB, in %.0f s", path, parameters(shape) / 1e9, total / 1e9,
             time.perf_counter() - started)
    return path


def _calibration(path: Path):
    from transformers import AutoTokenizer

    from compressor.calibration import calibration_set

    tokenizer = AutoTokenizer.from_pretrained(path)
    return calibration_set(common.CALIB_SOURCE, tokenizer, n=N_CALIB, seq_len=CALIB_LEN, seed=common.CALIB_SEED)


def _run_ours(job: dict[str, Any]) -> dict[str, Any]:
    from compressor import Recipe, compress

    passes = [{"gptq": {"scheme": {"bits": 4, "group_size": 128, "symmetric": True}}}]
    if job["method"] == "ours-stream-rotate":
        passes.insert(0, {"rotate": {}})
    calib = _calibration(Path(job["checkpoint"]))
    compress(job["checkpoint"], Recipe.from_dict({"passes": passes}), calibration=calib, output=job["output"],
             overwrite=True, quiet=True, stream=job["method"].startswith("ours-stream"))
    return {"status": "ok"}


def _run_llmc(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = _calibration(Path(job["checkpoint"]))
    rows = calib.input_ids.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(job["checkpoint"])
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset,
            recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            num_calibration_samples=N_CALIB, max_seq_length=CALIB_LEN, shuffle_calibration_samples=False,
            batch_size=1, pipeline="sequential")
    model.save_pretrained(job["output"], save_compressed=True)
    tokenizer.save_pretrained(job["output"])
    return {"status": "ok"}


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One compression in this (child) process."""
    peer = job["method"].startswith("llmc")
    found = common.versions("torch", "transformers", "compressed-tensors", "llmcompressor" if peer else "compressor")
    try:
        return {**(_run_llmc(job) if peer else _run_ours(job)), "versions": found}
    except Exception as err:  # a failure is a finding: recorded, never hidden
        log.exception("%s failed", job["method"])
        return {"status": "failed", "error": common.error_text(err), "versions": found}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--work", type=Path, default=WORK, help="where checkpoints and exports are written")
    parser.add_argument("--peer-python", default=str(common.PEER_PYTHON), help="python of the peer venv")
    parser.add_argument("--keep", action="store_true", help="keep the exports (default: removed after each run)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="only the first N decoder blocks of each shape (a peak-memory probe; recorded as such)")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="stop each run this many seconds in and record its peak RSS so far, a lower bound on "
                        "the whole run's (recorded with status 'stopped'): for runs too long to finish here, e.g. "
                        "llm-compressor at the 8B shape")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    common.add_output_arg(parser, BENCH)
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    if common.run_child_job(args, run):
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [s for s in shapes if s not in SHAPES] + [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown {bad}: shapes {list(SHAPES)}, methods {list(METHODS)}")
    output = common.output_path(args, BENCH)
    for name in shapes:
        checkpoint = build_checkpoint(name, args.work, args.blocks)
        shape = shape_of(name, args.blocks)
        n_params = parameters(shape)
        for method in methods:
            record: dict[str, Any] = {
                "bench": BENCH, "shape": name, "params": n_params, "method": method,
                "blocks": shape["num_hidden_layers"], "of_blocks": SHAPES[name]["num_hidden_layers"],
                "scheme": "W4 sym g128 (W4A16)", "algorithm": "rotate+gptq" if method.endswith("rotate") else "gptq",
                "calibration": {"source": common.CALIB_SOURCE, "n": N_CALIB, "seq_len": CALIB_LEN},
                "checkpoint_bytes": _dir_bytes(checkpoint),
            }
            python = sys.executable
            if method.startswith("llmc"):
                missing = common.missing_peer(args.peer_python)
                if missing:
                    common.emit({**record, **missing}, output)
                    continue
                python = args.peer_python
            export = args.work / f"export-{name}{_depth_suffix(args.blocks)}-{method}"
            shutil.rmtree(export, ignore_errors=True)
            job = {"method": method, "checkpoint": str(checkpoint), "output": str(export)}
            if args.stop_after:
                job["stop_after_s"] = args.stop_after
            log.info("%s %s: compressing", name, method)
            child = common.run_child([*common.module_command("scale", python), "--child"], job, verbose=args.verbose)
            result = child.record or {"status": "failed", "error": f"child exited {child.returncode} without a result"}
            record.update(result)
            record.update({"wall_s": child.wall_s, "peak_rss_mb": child.peak_rss_mb,
                           "s_per_bparam": round(child.wall_s / (n_params / 1e9), 1) if result["status"] == "ok"
                           else None, "export_bytes": _dir_bytes(export)})
            common.emit(record, output)
            if not args.keep:
                shutil.rmtree(export, ignore_errors=True)


if __name__ == "__main__":
    main()
