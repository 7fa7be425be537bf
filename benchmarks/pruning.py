"""Pruning quality on SmolLM2-135M: magnitude, Wanda, SparseGPT and layer allocations, beside llm-compressor.

Every (method, sparsity, allocation) runs in its own subprocess, so ``peak_rss_mb``
is that run's alone; the peers (llm-compressor's ``WandaPruningModifier`` and
``SparseGPTModifier``) run in their own venv (``benchmarks/setup_peers.sh``)
through ``_peer_llmc_prune.py``. One protocol for all (DESIGN.md): calibration
= 128 windows x 512 tokens of SOTU 1790-1999 at seeded random starts;
perplexity on the first 32768 tokens of SOTU 2010-2021, context 512. Every
``Linear`` inside the decoder blocks is pruned, ``lm_head`` and embeddings are not.

Two suites (``--suite``):

* ``peers``: magnitude, wanda, sparsegpt, llmc-wanda, llmc-sparsegpt at 50%
  unstructured and 2:4, uniform allocation;
* ``allocation``: wanda at 60% and 70% with uniform, global, lamp, owl,
  dp-linear (per-linear output energy) and dp-output (per-block network-output
  KL, the ``dp`` default) allocation.

One JSON line per run on stdout (and appended to ``--output``); logs on stderr.

    python -m benchmarks.pruning --suite allocation --output results.jsonl
    python -m benchmarks.pruning --methods wanda --sparsities 0.7 --allocations uniform,owl --quick
"""

from __future__ import annotations

import argparse
import logging
import time
import traceback
from pathlib import Path

from benchmarks import _common as common

log = logging.getLogger("benchmarks.pruning")

PEER_MODULE = "_peer_llmc_prune"
DEFAULT_PEER_PYTHON = common.PEER_PYTHON
OUR_METHODS = ("magnitude", "wanda", "sparsegpt")
PEER_METHODS = ("llmc-wanda", "llmc-sparsegpt")
ALL_METHODS = ("fp32",) + OUR_METHODS + PEER_METHODS
# allocation name on the command line -> our prune pass's allocation keys
ALLOCATION_KEYS = {
    "uniform": {"allocation": "uniform"},
    "global": {"allocation": "global"},
    "lamp": {"allocation": "lamp"},
    "owl": {"allocation": "owl"},
    "dp-linear": {"allocation": "dp", "dp_distortion": "relative"},  # per-linear relative output energy
    "dp-output": {"allocation": "dp", "dp_distortion": "output"},  # per-block network-output KL (the paper's)
}
ALLOCATIONS = tuple(ALLOCATION_KEYS)
SUITES = {
    "peers": {"methods": OUR_METHODS + PEER_METHODS, "sparsities": ("0.5", "2:4"), "allocations": ("uniform",)},
    "allocation": {"methods": ("wanda",), "sparsities": ("0.6", "0.7"), "allocations": ALLOCATIONS},
}


PROTOCOL_KEYS = ("quick", "n_calib", "calib_len", "max_tokens", "threads", "split", "set", "batch_size",
                 "true_sequential")


def record_for(job: dict) -> dict:
    """The fields every result line has; measurement fields start empty. ``protocol`` says how the run was
    measured, the evaluation split (test: SOTU 2010-2021, dev: 2000-2009) included."""
    return {
        "bench": "pruning",
        "model": common.MODEL_NAME,
        "method": job["method"],
        "sparsity": job.get("sparsity"),
        "allocation": job.get("allocation"),
        "ppl": None,
        "achieved_sparsity": None,
        "compress_s": None,
        "peak_rss_mb": None,
        "status": None,
        "machine": common.machine_info(),
        "protocol": {k: job.get(k, "test" if k == "split" else None) for k in PROTOCOL_KEYS},
    }


def block_sparsity(model) -> float:
    """Fraction of zero weights over the decoder blocks' linears (what was asked to be pruned)."""
    from torch import nn

    from compressor.core.arch import find_blocks

    _, blocks = find_blocks(model)
    zeros = total = 0
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return round(zeros / total, 5)


def recipe_for(job: dict) -> dict:
    """Our ``prune`` pass for one job."""
    sparsity = job["sparsity"]
    cfg: dict = {"method": job["method"]}  # default targets: every Linear but lm_head
    if job.get("true_sequential") and job["method"] != "magnitude":  # magnitude reads no inputs
        cfg["true_sequential"] = True
    if ":" in sparsity:
        cfg["structure"] = sparsity
    else:
        cfg.update(sparsity=float(sparsity), **ALLOCATION_KEYS[job["allocation"]])
    return {"passes": [{"prune": cfg}]}


def run_ours(job: dict) -> dict:
    """fp32 or one of our pruning runs, in this (child) process."""
    import torch

    import compressor
    from compressor.pipeline.sequential import PipelineConfig

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    record = record_for(job)
    record["versions"] = common.versions("torch", "transformers", "compressor")
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    model = common.load_fp32_model(path)
    if job["method"] != "fp32":
        calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
        record["calibration"] = calib.to_dict()
        recipe = compressor.Recipe.from_dict(common.with_overrides(recipe_for(job), job.get("set", [])))
        record["recipe"] = recipe.to_dict()
        try:
            start = time.perf_counter()
            pipeline = PipelineConfig(batch_size=job["batch_size"], quiet=True) if job.get("batch_size") else None
            record["batch_size"] = job.get("batch_size") or PipelineConfig().batch_size
            model = compressor.compress(model, recipe, calibration=calib.input_ids, quiet=True, pipeline=pipeline)
            record["compress_s"] = round(time.perf_counter() - start, 2)
        except Exception as err:  # recorded as a finding (traceback in the log), not hidden
            log.error("%s failed:\n%s", job, traceback.format_exc())
            record.update(status="failed", error=common.error_text(err))
            return record
    record["achieved_sparsity"] = block_sparsity(model)
    record.update(common.perplexity(model, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


def run_job(job: dict, peer_python: Path, verbose: bool) -> dict:
    """One job in a fresh subprocess; peak RSS from ``wait4``."""
    if job["method"] in PEER_METHODS:
        missing = common.missing_peer(peer_python)
        if missing:
            return {**record_for(job), **missing}
        command = common.module_command(PEER_MODULE, peer_python)
    else:
        command = [*common.module_command("pruning"), "--child"]
    log.info("running %s %s %s", job["method"], job.get("sparsity") or "", job.get("allocation") or "")
    run = common.run_child(command, job, verbose=verbose)
    return common.child_record(run, record_for(job))


def plan_jobs(methods: list[str], sparsities: list[str], allocations: list[str], protocol: dict) -> list[dict]:
    """The job list: N:M and peers take the uniform allocation only; fp32 runs once."""
    jobs = []
    for method in methods:
        if method == "fp32":
            jobs.append({"method": "fp32", **protocol})
            continue
        for sparsity in sparsities:
            fixed = ":" in sparsity or method in PEER_METHODS
            for allocation in ("uniform",) if fixed else allocations:
                jobs.append({"method": method, "sparsity": sparsity, "allocation": allocation, **protocol})
    return jobs


def _check_sparsity(text: str) -> str:
    if ":" in text:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise argparse.ArgumentTypeError(f"{text!r}: write N:M with 0 < N < M, e.g. 2:4")
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction such as 0.5, or N:M such as 2:4") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the fraction pruned must be in (0, 1)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Cost on 2 cores: wanda ~2 min, sparsegpt ~5 min per run; dp and owl "
                                     "add one dense calibration sweep.")
    parser.add_argument("--suite", choices=[*SUITES, "all"], help="a predefined job list (overrides the three lists)")
    parser.add_argument("--methods", default="wanda", help=f"comma list of {', '.join(ALL_METHODS)}")
    parser.add_argument("--sparsities", default="0.5", help="comma list of fractions (0.7) and N:M (2:4)")
    parser.add_argument("--allocations", default="uniform", help=f"comma list of {', '.join(ALLOCATIONS)}")
    common.add_protocol_args(parser, "smoke test: 8 x 128 calibration tokens, 2048 evaluation tokens")
    parser.add_argument("--batch-size", type=int, help="calibration sequences per forward in our pipeline (default: "
                        "the library's, 8; llm-compressor's runs use 1). The result depends on it only through "
                        "float rounding: with 1, our Wanda masks equal llm-compressor's bit for bit")
    parser.add_argument("--true-sequential", action="store_true", help="our wanda / sparsegpt prune each block "
                        "stage by stage (q/k/v, o, gate/up, down) on the already-pruned stages' outputs "
                        "(prune: {true_sequential: true}); llm-compressor's runs are unchanged")
    common.add_output_arg(parser, "pruning")
    common.add_set_arg(parser)
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON, help="python of the peer venv")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "pruning")
    common.setup_logging(args.verbose)
    if common.run_child_job(args, run_ours):
        return
    protocol = {**common.protocol_from_args(parser, args), "quick": args.quick}
    if args.set:
        protocol["set"] = args.set
    if args.batch_size is not None:
        if args.batch_size < 1:
            parser.error(f"--batch-size must be a positive integer, got {args.batch_size}")
        protocol["batch_size"] = args.batch_size
    if args.true_sequential:
        protocol["true_sequential"] = True
    if args.suite:
        suites = list(SUITES) if args.suite == "all" else [args.suite]
        jobs = [j for s in suites for j in plan_jobs(list(SUITES[s]["methods"]), list(SUITES[s]["sparsities"]),
                                                      list(SUITES[s]["allocations"]), protocol)]
    else:
        methods, allocations = _split(args.methods), _split(args.allocations)
        bad = [m for m in methods if m not in ALL_METHODS] + [a for a in allocations if a not in ALLOCATIONS]
        if bad or not methods or not allocations:
            parser.error(f"unknown or empty: {bad}; methods: {', '.join(ALL_METHODS)}; allocations: {', '.join(ALLOCATIONS)}")
        try:
            sparsities = [_check_sparsity(s) for s in _split(args.sparsities)]
        except argparse.ArgumentTypeError as err:
            parser.error(f"--sparsities {err}")
        jobs = plan_jobs(methods, sparsities, allocations, protocol)
    log.info("%d runs: %s", len(jobs), ", ".join(f"{j['method']}:{j.get('sparsity', '')}:{j.get('allocation', '')}" for j in jobs))
    for job in jobs:
        common.emit(run_job(job, args.peer_python, args.verbose), args.output)


if __name__ == "__main__":
    main()
