"""Peak memory of the naive vs the chunked logit distillation loss (forward + backward) on CPU.

At SmolLM2-135M's sizes by default: vocabulary 49152, 2048 tokens, hidden
width 576 for both student and teacher, float32, forward KL at T = 1. The naive
loss materializes both (T, V) logit matrices and every (T, V) intermediate
autograd saves; the chunked loss (``compressor.algorithms.distill.chunked.chunked_distill_loss``)
holds only (chunk_size, V) buffers at a time.

How memory is measured: torch's CPU allocations go through malloc, which
``tracemalloc`` does not see, so each variant runs in its own fresh subprocess
and reads its peak resident set size (``ru_maxrss``, a high-water mark, via
``getrusage``). The child builds the inputs (hidden states, both head weights),
runs a tiny warm-up of the same variant so that torch's one-time allocations
are not counted, records ``ru_maxrss`` as the baseline, then runs one forward
and backward pass at full size and records ``ru_maxrss`` again. The reported
``peak_delta_mb`` is the difference: the extra peak memory of the loss
computation including the gradients it produces (hidden states (T, D) and
head weight (V, D), the same for both variants). Resident pages are counted
only once touched, and every buffer here is written, so this is the memory the
loss really used; it is an upper bound on the allocator's live peak (freed
heap memory may be kept by malloc rather than unmapped).

Usage::

    python -m benchmarks.distill_loss_memory                 # ~1 min on 2 cores, ~3 GB peak for naive
    python -m benchmarks.distill_loss_memory --tokens 512 --chunk-size 128 --output mem.jsonl

One JSON line per variant; the chunked line carries ``ratio_vs_naive`` (target: <= 1/8).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.distill_loss_memory")

BENCH = "distill_loss_memory"
VARIANTS = ("naive", "chunked")
TARGET_RATIO = 1 / 8


def _inputs(vocab: int, tokens: int, hidden: int, seed: int):
    """Student hidden (T, D) with grad, student head (V, D) with grad, teacher hidden and head (constants)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(tokens, hidden, generator=g).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    ht = torch.randn(tokens, hidden, generator=g)
    wt = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    return hs, ws, ht, wt


def _loss_fn(variant: str):
    from compressor.algorithms.distill.chunked import chunked_distill_loss, naive_distill_loss

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")
    return chunked_distill_loss if variant == "chunked" else naive_distill_loss


def measure(variant: str, *, vocab: int, tokens: int, hidden: int, chunk_size: int, kind: str = "forward_kl",
            seed: int = 0) -> dict[str, Any]:
    """One forward + backward of ``variant`` in this process; peak RSS growth over the post-setup baseline.

    Returns a dict with ``loss``, ``grad_norm`` (of the student head weight), ``seconds``,
    ``baseline_rss_mb``, ``peak_rss_mb`` and ``peak_delta_mb`` (MiB). Meaningful as a memory
    figure only in a fresh process (``ru_maxrss`` never goes down).
    """
    fn = _loss_fn(variant)
    small = _inputs(min(vocab, 64), min(tokens, 8), hidden, seed)  # warm-up: torch's one-time allocations
    fn(*small, kind=kind, chunk_size=chunk_size).backward()
    del small
    hs, ws, ht, wt = _inputs(vocab, tokens, hidden, seed)
    baseline = common.peak_rss_mb()
    start = time.perf_counter()
    loss = fn(hs, ws, ht, wt, kind=kind, chunk_size=chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = common.peak_rss_mb()
    return {
        "loss": loss.item(),
        "grad_norm": ws.grad.norm().item(),
        "seconds": round(seconds, 4),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "peak_delta_mb": round(peak - baseline, 1),
    }


def _child(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job.pop("threads"))
    return {"variant": job["variant"], **measure(**job)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--kind", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    common.add_output_arg(parser, "distill_loss_memory")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "distill_loss_memory")
    common.setup_logging(args.verbose)
    if common.run_child_job(args, _child):
        return 0

    sizes = {"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden, "chunk_size": args.chunk_size,
             "kind": args.kind}
    machine, versions = common.machine_info(), common.versions("torch")
    machine["threads"] = args.threads
    results: dict[str, dict[str, Any]] = {}
    status = 0
    for variant in VARIANTS:
        log.info("running %s at %s", variant, sizes)
        run = common.run_child([*common.module_command("distill_loss_memory"), "--child"],
                               {"variant": variant, "threads": args.threads, **sizes}, verbose=args.verbose)
        record: dict[str, Any] = {"bench": BENCH, "variant": variant, **sizes, "dtype": "float32",
                                  "temperature": 1.0, "memory_method": "child ru_maxrss after fwd+bwd minus after setup",
                                  "child_peak_rss_mb": run.peak_rss_mb, "wall_s": run.wall_s}
        if run.record is None:
            record["status"] = run.failure()
            status = 1
        else:
            record.update({k: v for k, v in run.record.items() if k != "variant"})
            record["status"] = "ok"
            results[variant] = record
        if variant == "chunked" and "naive" in results and variant in results:
            naive = results["naive"]
            record["ratio_vs_naive"] = round(record["peak_delta_mb"] / naive["peak_delta_mb"], 4)
            record["target_ratio"] = TARGET_RATIO
            record["meets_target"] = record["ratio_vs_naive"] <= TARGET_RATIO
            record["loss_rel_diff_vs_naive"] = abs(record["loss"] - naive["loss"]) / abs(naive["loss"])
            record["grad_norm_rel_diff_vs_naive"] = abs(record["grad_norm"] - naive["grad_norm"]) / naive["grad_norm"]
        record["machine"], record["versions"] = machine, versions
        common.emit(record, args.output)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
