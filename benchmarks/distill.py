"""Distillation on SmolLM2-135M: how much of a compressed student's perplexity gap to the teacher it closes.

For each student (a 2:4 Wanda-pruned model, a W3 g64 RTN model) in its own
subprocess: compress the fp32 teacher with the usual calibration protocol
(128 x 512 tokens of SOTU 1790-1999, seed 0), measure perplexity (SOTU
2010-2021, first 32768 tokens, context 512), distill on windows of SOTU
1790-1999 drawn with seed 1 (so they are not the calibration windows), measure
again, export, reload the export and measure once more. One JSON line per
student: perplexities, the fraction of the gap closed, steps, tokens seen, wall
time, peak memory. The chunked logit loss's memory is measured by
``distill_loss_memory.py``.

    python -m benchmarks.distill --students wanda24 --steps 60 --output results.jsonl
    python -m benchmarks.distill --quick
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchmarks import _common as common

log = logging.getLogger("benchmarks.distill")

STUDENTS = {
    "wanda24": [{"prune": {"method": "wanda", "structure": "2:4"}}],
    "rtn-w3g64": [{"rtn": {"scheme": {"bits": 3, "group_size": 64, "symmetric": False}}}],
}
TEACHER_PPL_KEY = "teacher_ppl"


def run_student(job: dict) -> dict:
    """Compress, distill, export, reload: in this (child) process."""
    import torch

    import compressor
    from compressor.api import load_model
    from compressor.calibration import calibration_set
    from compressor.pipeline.trainer import DistillConfig, distill

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    record = {"bench": "distill", "model": common.MODEL_NAME, "student": job["student"], "status": None,
              "machine": common.machine_info(), "versions": common.versions("torch", "transformers", "accelerate", "compressor")}
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer)
    teacher = common.load_fp32_model(path)
    record[TEACHER_PPL_KEY] = common.perplexity(teacher, ids, job["max_tokens"])["ppl"]
    student = common.load_fp32_model(path)
    calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
    start = time.perf_counter()
    compressor.compress(student, compressor.Recipe.from_dict({"passes": STUDENTS[job["student"]]}),
                        calibration=calib.input_ids, quiet=True)
    record["compress_s"] = round(time.perf_counter() - start, 2)
    record["ppl_before"] = common.perplexity(student, ids, job["max_tokens"])["ppl"]
    data = calibration_set(common.CALIB_SOURCE, tokenizer, n=job["samples"], seq_len=job["seq_len"], seed=1).input_ids
    cfg = DistillConfig(steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], warmup=0.1, quiet=True)
    record["distill"] = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seq_len": job["seq_len"],
                         "samples": job["samples"], "kind": cfg.kind, "data": f"{common.CALIB_SOURCE} seed 1"}
    result = distill(teacher, student, data, cfg)
    record.update(distill_s=result.wall_s, tokens_seen=result.tokens_seen, loss_first=result.losses[0][1],
                  loss_last=result.losses[-1][1])
    record["ppl_after"] = common.perplexity(student, ids, job["max_tokens"])["ppl"]
    gap = record["ppl_before"] - record[TEACHER_PPL_KEY]
    record["gap_closed"] = round((record["ppl_before"] - record["ppl_after"]) / gap, 4) if gap > 0 else None
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        out = Path(tmp) / "export"
        from compressor.export.compressed_tensors import save_compressed
        from compressor.export.pruned import save_pruned
        from compressor.core.state import is_quantized

        quantized = any(is_quantized(m) for m in student.modules())
        (save_compressed if quantized else save_pruned)(student, out)
        record["export"] = "pack-quantized" if quantized else "plain checkpoint"
        reloaded = load_model(out, dtype=torch.float32)
        record["ppl_reloaded"] = common.perplexity(reloaded, ids, job["max_tokens"])["ppl"]
    record["status"] = "ok"
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", default="wanda24,rtn-w3g64", help=f"comma list of {', '.join(STUDENTS)}")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--samples", type=int, default=512, help="training windows drawn")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 x 128 calibration, 2048 eval tokens, 4 steps")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    common.add_output_arg(parser, "distill")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "distill")
    common.setup_logging(args.verbose)
    if common.run_child_job(args, run_student):
        return
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    unknown = [s for s in students if s not in STUDENTS]
    if unknown or not students:
        parser.error(f"unknown students {unknown}: use {', '.join(STUDENTS)}")
    for name in ("steps", "batch_size", "seq_len", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    protocol = dict(common.QUICK if args.quick else common.FULL)
    steps = 4 if args.quick else args.steps
    for student in students:
        job = {"student": student, **protocol, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
               "samples": args.samples, "lr": args.lr, "threads": args.threads}
        log.info("running %s", student)
        run = common.run_child([*common.module_command("distill"), "--child"], job, verbose=args.verbose)
        record = run.record or {"bench": "distill", "student": student, "status": "failed", "error": run.failure()}
        record.update(peak_rss_mb=run.peak_rss_mb, wall_s=run.wall_s, protocol={**protocol, "quick": args.quick})
        common.emit(record, args.output)


if __name__ == "__main__":
    main()
