"""End to end on SmolLM2-135M: round-to-nearest W4, export, reload, perplexity.

Prints one table: fp32 and RTN W4 g64 / g128 (asymmetric) perplexities on SOTU
2010-2021 (32768 tokens, context 512), the export's size and bits per weight,
and the perplexity of the reloaded export. Run with ``make demo``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from compressor import Recipe, compress, load_compressed, save_compressed
from compressor.api import load_model, load_tokenizer
from compressor.calibration import load_text, tokenize
from compressor.eval.perplexity import perplexity
from compressor.fixtures import smollm2_dir
from compressor.inspect import summarize

log = logging.getLogger("demo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("out/demo"))
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model_dir = smollm2_dir()
    tokenizer = load_tokenizer(model_dir)
    ids = tokenize(load_text("sotu:2010-2021"), tokenizer)

    def ppl(model) -> float:
        return perplexity(model, ids, ctx=args.ctx, max_tokens=args.max_tokens, quiet=args.quiet).ppl

    rows = []
    log.info("fp32 perplexity")
    rows.append({"model": "fp32", "ppl": ppl(load_model(model_dir)), "size_mb": summarize(model_dir)["weights_bytes"] / 1e6,
                 "bits_per_weight": 32.0, "ppl_reloaded": None, "compress_s": None})
    for gs in args.group_sizes:
        recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": gs, "symmetric": False}}}]})
        model = load_model(model_dir)
        t0 = time.perf_counter()
        compress(model, recipe, quiet=args.quiet)
        seconds = time.perf_counter() - t0
        out = args.output / f"smollm2-rtn-w4g{gs}"
        save_compressed(model, out, tokenizer=tokenizer, recipe=recipe, overwrite=True, info={"source_model": str(model_dir)})
        log.info("W4 g%d perplexity (in memory, then reloaded)", gs)
        in_memory = ppl(model)
        del model
        reloaded = ppl(load_compressed(out))
        info = summarize(out)
        rows.append({"model": f"RTN W4 g{gs} asym", "ppl": in_memory, "size_mb": info["weights_bytes"] / 1e6,
                     "bits_per_weight": info["bits_per_weight"], "ppl_reloaded": reloaded, "compress_s": seconds})

    print(f"\nSmolLM2-135M-Instruct, SOTU 2010-2021, {args.max_tokens} tokens, ctx {args.ctx} "
          f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"| {'model':<18} | {'perplexity':>10} | {'reloaded':>10} | {'size MB':>8} | {'bits/weight':>11} | {'compress s':>10} |")
    print(f"|{'-' * 20}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 12}|")
    for r in rows:
        reloaded = "-" if r["ppl_reloaded"] is None else f"{r['ppl_reloaded']:.4f}"
        seconds = "-" if r["compress_s"] is None else f"{r['compress_s']:.2f}"
        print(f"| {r['model']:<18} | {r['ppl']:>10.4f} | {reloaded:>10} | {r['size_mb']:>8.1f} "
              f"| {r['bits_per_weight']:>11.3f} | {seconds:>10} |")
    (args.output / "demo.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
