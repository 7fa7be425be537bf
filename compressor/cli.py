"""Command line: ``compressor compress | distill | eval | inspect``. Each subcommand calls one API function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

log = logging.getLogger("compressor")

# preset -> (weight bits, input activation bits or None); the A8 ones are symmetric per-channel weights with 8-bit
# per-token inputs, exported int-quantized for vLLM's W8A8 path (w7a8: 7-bit codes, exact on CPUs without VNNI)
_PRESETS = {"w2a16": (2, None), "w3a16": (3, None), "w4a16": (4, None), "w8a16": (8, None),
            "w8a8": (8, 8), "w7a8": (7, 8)}
# float weight-only presets -> scheme (compressed-tensors float-quantized / nvfp4- / mxfp4-pack-quantized)
_FLOAT_PRESETS = {
    "w8a16-fp8": {"type": "float", "bits": 8, "group_size": -1, "symmetric": True},
    "w4a16-nvfp4": {"type": "float", "bits": 4, "group_size": 16, "symmetric": True, "scale_format": "e4m3"},
    "w4a16-mxfp4": {"type": "float", "bits": 4, "group_size": 32, "symmetric": True, "scale_format": "e8m0"},
    "w8a16-fp8-block": {"type": "float", "bits": 8, "group_size": 128, "symmetric": True, "block_rows": 128},
    "w8a16-fp8-tensor": {"type": "float", "bits": 8, "group_size": -1, "symmetric": True, "block_rows": -1},
}
# float W8A8 / W4A4 presets -> (the weight-only preset of their weights, the input format): compressed-tensors'
# FP8_DYNAMIC (per-channel E4M3 weights, dynamic per-token E4M3 inputs), NVFP4 and MXFP4
_FLOAT_ACT_PRESETS = {"fp8": ("w8a16-fp8", "fp8"), "fp8-block": ("w8a16-fp8-block", "fp8-block"),
                      "fp8-tensor": ("w8a16-fp8-tensor", "fp8"), "fp8-static": ("w8a16-fp8-tensor", "fp8-static"),
                      "nvfp4": ("w4a16-nvfp4", "nvfp4"), "mxfp4": ("w4a16-mxfp4", "mxfp4")}
# preset -> llama-quantize mix, written as one GGUF file for llama.cpp by the gguf pass
_GGUF_PRESETS = {m.lower(): m for m in ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S",
                                         "Q2_K")}


def _add_hub_args(parser: argparse.ArgumentParser, what: str) -> None:
    """``--revision`` and ``--trust-remote-code`` for commands that take Hub repo ids."""
    parser.add_argument("--revision", default=None, help=f"branch, tag or commit of {what} given as a Hub repo id")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a repo's own modelling code (config.json auto_map) to run; off by default")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compressor", description="Compress, export and evaluate Hugging Face models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="run a recipe on a model and export it")
    c.add_argument("model", help="Hugging Face model directory or Hub repo id (e.g. Qwen/Qwen3-0.6B)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", type=Path, help="recipe YAML")
    src.add_argument("--scheme", choices=sorted(_PRESETS) + sorted(_FLOAT_PRESETS) + sorted(_FLOAT_ACT_PRESETS)
                     + sorted(_GGUF_PRESETS),
                     help="preset: weight-only (wNa16), W8A8 / W7A8 (symmetric per-channel weights, 8-bit per-token "
                     "inputs), float weight-only (w8a16-fp8 per channel, w4a16-nvfp4, w4a16-mxfp4; their group size "
                     "is fixed; w8a16-fp8-block: 128 x 128 blocks; w8a16-fp8-tensor: one scale per matrix), float weights "
                     "and inputs (fp8: W8A8 with dynamic per-token FP8 inputs; fp8-tensor: the same with per-tensor "
                     "weights; fp8-static: per-tensor weights and static per-tensor inputs, llm-compressor's FP8; fp8-block: 128 x 128 weight blocks, inputs per token and 128 features; "
                     "nvfp4, mxfp4: W4A4), or a llama.cpp GGUF mix (q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m, q2_k, ...: --output names a .gguf file)")
    c.add_argument("--group-size", type=int, default=None,
                   help="with --scheme: group size, -1 = per-channel (default 128; W8A8 / W7A8: -1)")
    c.add_argument("--symmetric", action="store_true",
                   help="with --scheme: symmetric (default asymmetric; W8A8 / W7A8: always symmetric)")
    c.add_argument("--observer", choices=("minmax", "mse"), default="minmax", help="with --scheme")
    c.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="with --scheme: rounding method (GGUF mixes: rtn = nearest codes on imatrix-weighted scales, "
                   "as llama-quantize --imatrix; gptq = GPTQ codes on them)")
    c.add_argument("--calibration", default="sotu:1790-1999", help="calibration text for data-driven passes")
    c.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    c.add_argument("--device", default=None, help="compute device for the sequential pipeline (default: cuda if available)")
    c.add_argument("--activation-cache", choices=("device", "cpu", "disk"), default="device",
                   help="where block inputs are kept between blocks")
    c.add_argument("--forward-dtype", choices=("auto", "model", "float32"), default="auto",
                   help="precision of the calibration forwards: auto = float32 on a CPU for bfloat16/float16 "
                   "weights (CPU half-precision matmuls are several times slower), as stored on a GPU")
    c.add_argument("--propagate", choices=("compressed", "full_precision"), default="compressed",
                   help="the next block's inputs: each block's outputs with its compressed weights (two forwards "
                   "per block), or from before it was compressed (one forward: every block calibrated on the "
                   "full-precision model's inputs; not with GPTAQ or --checkpoint-dir)")
    c.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="save each finished block there; rerunning the same command resumes")
    c.add_argument("--stream", action="store_true",
                   help="read each decoder block from the checkpoint when its turn comes and write it into the "
                   "export once compressed: host memory holds one block, not the model (rotate, rtn, gptq, prune with uniform, "
                   "OWL or per-linear DP allocation; MoE checkpoints too)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. rtn.scheme.bits=3 (repeatable)")
    c.add_argument("--output", "-o", type=Path, required=True,
                   help="export directory (a .gguf file with a GGUF scheme or a recipe with a gguf pass)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _add_hub_args(c, "the model")

    d = sub.add_parser("distill", help="train a compressed student to match its teacher, then export it")
    d.add_argument("--teacher", required=True, help="the original Hugging Face model: a directory or Hub repo id")
    d.add_argument("--student", required=True, help="the compressed model: an export or a pruned checkpoint "
                   "(directory or Hub repo id)")
    d.add_argument("--data", default="sotu:1790-1999", help="training text source (sotu:Y1-Y2, .txt, .jsonl)")
    d.add_argument("--samples", type=int, default=256, help="training windows drawn from the text")
    d.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    d.add_argument("--steps", type=int, default=100, help="optimizer steps")
    d.add_argument("--batch-size", type=int, default=4, help="sequences per step over all processes")
    d.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process per step")
    d.add_argument("--lr", type=float, default=1e-5)
    d.add_argument("--kind", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--alpha", type=float, default=0.0, help="weight of the ground-truth cross entropy")
    d.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    d.add_argument("--gradient-checkpointing", action="store_true")
    d.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    d.add_argument("--checkpoint-every", type=int, default=0, help="resumable checkpoint every N steps (0: at the end)")
    d.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <output>.ckpt")
    d.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--losses-json", type=Path, default=None, help="write the loss of every step there")
    d.add_argument("--output", "-o", type=Path, required=True, help="where the distilled student is written")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", "-q", action="store_true")
    _add_hub_args(d, "the teacher")

    e = sub.add_parser("eval", help="compare models and exports: perplexity, KL to the first, tasks, size, speed")
    e.add_argument("models", nargs="+", help="model directories, exports or Hub repo ids; the first is the base the "
                   "others are compared to")
    e.add_argument("--dataset", default="sotu:2010-2021", help="sotu:Y1-Y2, a .txt, a .jsonl[#field], hf:NAME:SPLIT")
    e.add_argument("--ctx", type=int, default=512, help="context length")
    e.add_argument("--stride", type=int, default=None, help="window stride (default: ctx, non-overlapping)")
    e.add_argument("--max-tokens", type=int, default=32768, help="tokens evaluated (0 = all)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--tasks", default=None, metavar="TASKS",
                   help="comma-separated: a multiple-choice task file (context, choices, gold) or a shipped task "
                        "(phrases), and/or lm-evaluation-harness tasks (hellaswag,arc_easy; needs compressor[lmeval])")
    e.add_argument("--lm-eval-limit", type=float, default=None, metavar="N",
                   help="documents per lm-evaluation-harness task (a fraction when < 1; default: all)")
    e.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed per model (0 = skip)")
    e.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for the speed measurement")
    e.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="load dtype (default: as stored)")
    e.add_argument("--backend", choices=("auto", "reference", "triton", "cpu"), default="auto",
                   help="dequant-matmul backend for exports")
    e.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto")
    e.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map auto: memory per device, e.g. 0=10GiB,cpu=30GiB; the rest is offloaded")
    e.add_argument("--offload-folder", type=Path, default=None, metavar="DIR",
                   help="with --device-map auto: disk offload for modules that fit in no --max-memory budget")
    e.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the rows as JSON to PATH; without PATH, one JSON line per model on stdout instead of the table")
    e.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write a Markdown report")
    e.add_argument("--plot", type=Path, default=None, metavar="PATH.png", help="plot perplexity against bits per weight")
    e.add_argument("--dump-nll", type=Path, default=None, metavar="DIR",
                   help="write per-token NLL (and KL to the base) of each model as DIR/<name>.safetensors")
    e.add_argument("--quiet", "-q", action="store_true")
    _add_hub_args(e, "every model")

    i = sub.add_parser("inspect", help="schemes, sizes and bits per weight of an export")
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true")
    i.add_argument("--sparsity", action="store_true", help="also read the weights and list each layer's sparsity")
    i.add_argument("--bits", action="store_true",
                   help="list each quantized layer's stored bits per weight (a mixed-precision allocation)")
    i.add_argument("--plot", type=Path, default=None, metavar="PATH.png",
                   help="bar chart of per-layer bits per weight with --bits, else of per-layer sparsity "
                   "(implies --sparsity)")
    return p


def _recipe(args):
    from compressor.recipe import Recipe, apply_overrides, load_yaml

    if args.recipe is not None:
        if not args.recipe.is_file():
            raise FileNotFoundError(f"recipe file {args.recipe} does not exist")
        data = load_yaml(args.recipe.read_text(encoding="utf-8")) or {}
    elif args.scheme in _GGUF_PRESETS:
        method = "gptq" if args.method == "gptq" else "nearest"
        data = {"passes": [{"gguf": {"mix": _GGUF_PRESETS[args.scheme], "method": method}}]}
    elif args.scheme in _FLOAT_PRESETS or args.scheme in _FLOAT_ACT_PRESETS:
        weights, act = _FLOAT_ACT_PRESETS.get(args.scheme, (args.scheme, None))
        scheme = {**_FLOAT_PRESETS[weights], "observer": args.observer}
        if args.group_size is not None and weights != "w8a16-fp8":
            raise ValueError(f"--group-size: {args.scheme} has a fixed group size ({scheme['group_size']})")
        if args.group_size is not None:
            scheme["group_size"] = args.group_size
        data = {"passes": [{args.method: {"scheme": scheme}}]}
        if act is not None:
            data["passes"].append({"quantize_activations": {"format": act, "bits": scheme["bits"]}})
    else:
        bits, act_bits = _PRESETS[args.scheme]
        group_size = args.group_size if args.group_size is not None else (-1 if act_bits else 128)
        scheme = {"bits": bits, "group_size": group_size, "symmetric": args.symmetric or bool(act_bits),
                  "observer": args.observer}
        data = {"passes": [{args.method: {"scheme": scheme}}]}
        if act_bits:
            data["passes"].append({"quantize_activations": {"bits": act_bits}})
    return Recipe.from_dict(apply_overrides(data, args.overrides))


def _cmd_compress(args) -> int:
    from compressor.api import compress, load_tokenizer
    from compressor.core.distributed import is_main
    from compressor.core.hub import resolve_model
    from compressor.pipeline.sequential import PipelineConfig

    recipe = _recipe(args)
    model = resolve_model(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    calibration = None
    if any(p.requires_calibration for p in recipe.build()):
        from compressor.calibration import calibration_set

        tokenizer = load_tokenizer(model, trust_remote_code=args.trust_remote_code)
        calibration = calibration_set(args.calibration, tokenizer, n=args.num_samples, seq_len=args.seq_len,
                                      seed=recipe.seed)
    pipeline = PipelineConfig(device=args.device, cache=args.activation_cache, checkpoint_dir=args.checkpoint_dir,
                              quiet=args.quiet, forward_dtype=args.forward_dtype, propagate=args.propagate)
    compress(model, recipe, calibration=calibration, output=args.output, overwrite=args.overwrite,
             pipeline=pipeline, quiet=args.quiet, trust_remote_code=args.trust_remote_code, stream=args.stream)
    if is_main():  # under torchrun / accelerate launch only rank 0 writes
        log.info("export written to %s", args.output)
    return 0


def _cmd_distill(args) -> int:
    from compressor.distill import distill_checkpoint
    from compressor.pipeline.trainer import DistillConfig

    config = DistillConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           kind=args.kind, temperature=args.temperature, alpha=args.alpha,
                           mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                           max_grad_norm=args.max_grad_norm, checkpoint_every=args.checkpoint_every, seed=args.seed, quiet=args.quiet)
    distill_checkpoint(args.teacher, args.student, args.output, data=args.data, samples=args.samples,
                       seq_len=args.seq_len, config=config, checkpoint_dir=args.checkpoint_dir,
                       resume=not args.no_resume, overwrite=args.overwrite, losses_json=args.losses_json,
                       revision=args.revision, trust_remote_code=args.trust_remote_code)
    return 0


def _cmd_eval(args) -> int:
    from compressor.eval.distributed import is_main_process, num_processes
    from compressor.eval.lmeval import lm_eval_missing, split_tasks
    from compressor.eval.report import format_table, matplotlib_missing, plot_ppl_vs_bits, write_json, write_markdown
    from compressor.eval.suite import SuiteConfig, evaluate_models

    if not is_main_process():  # under accelerate launch: rank 0 logs, prints and writes
        logging.getLogger().setLevel(logging.WARNING)
    if args.plot is not None and matplotlib_missing():
        raise ValueError(matplotlib_missing())  # before the evaluation, not after it
    task_file, lm_tasks = split_tasks(args.tasks)
    if lm_tasks and lm_eval_missing():
        raise ValueError(f"--tasks {','.join(lm_tasks)}: {lm_eval_missing()}")
    limit = int(args.lm_eval_limit) if args.lm_eval_limit and args.lm_eval_limit >= 1 else args.lm_eval_limit
    config = SuiteConfig(dataset=args.dataset, ctx=args.ctx, stride=args.stride, max_tokens=args.max_tokens or None,
                         batch_size=args.batch_size, tasks=task_file, lm_eval_tasks=lm_tasks, lm_eval_limit=limit,
                         decode_tokens=args.decode_tokens, prompt_tokens=args.prompt_tokens, dtype=args.dtype,
                         backend=args.backend, device_map=args.device_map, max_memory=args.max_memory,
                         offload_folder=args.offload_folder, dump_dir=args.dump_nll, quiet=args.quiet,
                         revision=args.revision, trust_remote_code=args.trust_remote_code)
    stream = args.json == "-"
    on_row = (lambda row: print(json.dumps(row), flush=True)) if stream else None  # noqa: E731
    rows = evaluate_models(args.models, config, on_row=on_row)
    if not is_main_process():
        return 0
    meta = config.to_dict() | {"processes": num_processes()}
    if not stream:
        print(format_table(rows))
    if args.json and not stream:
        log.info("JSON written to %s", write_json(rows, args.json, meta))
    if args.markdown:
        log.info("Markdown written to %s", write_markdown(rows, args.markdown, meta))
    if args.plot:
        log.info("plot written to %s", plot_ppl_vs_bits(rows, args.plot))
    return 0


def _cmd_inspect(args) -> int:
    from compressor.inspect import (
        format_bits,
        format_sparsity,
        format_summary,
        layer_sparsity,
        plot_bits,
        plot_sparsity,
        summarize,
    )

    info = summarize(args.path)
    if args.sparsity or (args.plot and not args.bits):
        info["layer_sparsity"] = layer_sparsity(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_summary(info))
        if args.bits:
            print(format_bits(info.get("layer_bits") or {}))
        if "layer_sparsity" in info:
            print(format_sparsity(info["layer_sparsity"]))
    if args.plot and args.bits:
        log.info("plot written to %s", plot_bits(info.get("layer_bits") or {}, args.plot, title=str(args.path)))
    elif args.plot:
        log.info("plot written to %s", plot_sparsity(info["layer_sparsity"], args.plot, title=str(args.path)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"compress": _cmd_compress, "distill": _cmd_distill, "eval": _cmd_eval, "inspect": _cmd_inspect}
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError, NotImplementedError, OSError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
