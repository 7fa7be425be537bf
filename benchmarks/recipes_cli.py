"""Each file in ``recipes/`` run as a user runs it: the CLI, with its default calibration, then ``compressor eval``.

For every recipe (default: all of ``recipes/*.yaml``)::

    compressor compress SMOLLM2 --recipe recipes/<name>.yaml -o OUT --quiet
    compressor eval SMOLLM2 OUT --dataset sotu:2010-2021 --ctx 512 --max-tokens 32768 --json ROWS

on the fp32 SmolLM2-135M fixture. The CLI's default calibration (``sotu:1790-1999``, 128 x 512 tokens, seed
0) and that evaluation are the shared protocol's, so the export's perplexity should equal the one
``benchmarks/quant_quality.py`` measured in memory for the same recipe (the method ``gptaq`` at the setting the
file is named after, which ``tests/test_recipes.py`` checks the file equals): the export reloads through
``load_compressed`` with the in-memory model's logits. One record per recipe goes to
``benchmarks/results/recipes_cli.jsonl`` with both numbers, the commands and their times; docs/recipes.md's
table shows them (``python -m benchmarks.report``).

    python -m benchmarks.recipes_cli --recipes w4g64,w4g128,w4pc,w3g64   # the uniform ones (~25 min, 2 cores)
    python -m benchmarks.recipes_cli                         # every recipe: mixed-3.5bpw's allocation adds ~90 min
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as common
from benchmarks.report import RECIPES, TIE, full_protocol, load_records, newest, recipe_method

log = logging.getLogger("benchmarks.recipes_cli")

BENCH = "recipes_cli"
# a CLI perplexity within this relative distance of the benchmark's reproduces it when both ran on the same kind
# of machine (the same model and tokens: only the order of float sums in the export's reload may differ); from
# another machine (other BLAS kernels round GPTQ's solves differently) the protocol's tie band (report.TIE)
REPRODUCED = 1e-3


def cli() -> list[str]:
    """The command that runs our CLI from this interpreter's environment."""
    script = Path(sys.executable).parent / "compressor"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from compressor.cli import main; "
                                                                       "raise SystemExit(main())"]


def commands(recipe: Path, model: Path, out: Path, rows: Path, max_tokens: int, *, dataset: str = common.EVAL_SOURCE,
             ctx: int = common.CTX, calibration: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """``(compress, eval)`` argument lists for one recipe; ``calibration``: extra ``compress`` options (the
    protocol takes the CLI's defaults: none)."""
    compress = [*cli(), "compress", str(model), "--recipe", str(recipe), *calibration, "-o", str(out), "--quiet",
                "--overwrite"]
    evaluate = [*cli(), "eval", str(model), str(out), "--dataset", dataset, "--ctx", str(ctx),
                "--max-tokens", str(max_tokens), "--json", str(rows), "--quiet"]
    return compress, evaluate


def shown(argv: list[str], model: Path, out: Path, rows: Path) -> str:
    """``argv`` as the docs quote it: ``compressor``, SMOLLM2, OUT and ROWS instead of this machine's paths."""
    names = {str(model): "SMOLLM2", str(out): "OUT", str(rows): "ROWS"}
    words = ["compressor"] + argv[len(cli()):]
    return " ".join(names.get(w, str(Path(w).relative_to(common.ROOT)) if w.startswith(str(common.ROOT)) else w)
                    for w in words)


def export_ppl(rows: Path) -> float:
    """The export's perplexity from ``compressor eval --json`` (the second row; the first is the base model)."""
    table = json.loads(rows.read_text(encoding="utf-8"))["rows"]
    if len(table) < 2:
        raise ValueError(f"{rows}: expected the base model's row and the export's, got {len(table)}")
    return float(table[1]["ppl"])


def machine_kind(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(cpu, isa)`` of a record's machine: what decides whether two runs should agree to round-off."""
    machine = record.get("machine") or {}
    return machine.get("cpu"), machine.get("isa")


def compare(record: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """``record`` (a CLI run with its ``ppl`` and ``machine``) with the comparison against the benchmark's
    record ``ref`` added: its perplexity, commit, machine, the relative difference and ``reproduced`` (within
    :data:`REPRODUCED` on the same kind of machine, within :data:`TIE` from another), None without a ``ref``."""
    if ref is None:
        return {**record, "benchmark_ppl": None, "reproduced": None}
    diff = abs(record["ppl"] - ref["ppl"]) / ref["ppl"]
    same = machine_kind(record) == machine_kind(ref)
    return {**record, "benchmark_ppl": ref["ppl"], "benchmark_commit": (ref.get("commit") or "")[:8],
            "benchmark_machine": dict(zip(("cpu", "isa"), machine_kind(ref))), "same_machine": same,
            "rel_diff": round(diff, 6), "reproduced": diff <= (REPRODUCED if same else TIE)}


def benchmark_ppl(setting: str) -> dict[str, Any] | None:
    """The newest full-protocol record of the recipe's method at ``setting`` (quant_quality.jsonl), or None."""
    records = [r for r in load_records("quant_quality") if full_protocol(r)]
    return newest(records, method=recipe_method(setting), setting=setting, status="ok")


def run_one(recipe: Path, model: Path, work: Path, max_tokens: int, **options: Any) -> dict[str, Any]:
    """Compress with the CLI, evaluate the export, compare with the benchmark's number; one record.
    ``options`` go to :func:`commands` (tests: a small dataset and calibration)."""
    out, rows = work / recipe.stem, work / f"{recipe.stem}.json"
    compress, evaluate = commands(recipe, model, out, rows, max_tokens, **options)
    record: dict[str, Any] = {"bench": BENCH, "model": common.MODEL_NAME, "recipe": f"recipes/{recipe.name}",
                              "setting": recipe.stem, "commands": [shown(c, model, out, rows)
                                                                   for c in (compress, evaluate)],
                              "protocol": {"calibration": "CLI default", "max_tokens": max_tokens,
                                           "split": "test", **options}}
    for key, argv in (("compress_s", compress), ("eval_s", evaluate)):
        start = time.perf_counter()
        run = subprocess.run(argv, capture_output=True, text=True, cwd=common.ROOT)
        record[key] = round(time.perf_counter() - start, 1)
        if run.returncode:
            tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
            record.update(status="failed", error=f"{argv[len(cli())]} exited {run.returncode}: " + " | ".join(tail))
            return record
    record.update(status="ok", ppl=round(export_ppl(rows), 4), machine=common.machine_info())
    shutil.rmtree(out, ignore_errors=True)
    return compare(record, benchmark_ppl(recipe.stem))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", help="comma list of recipe names (the files' stems; default: every file)")
    parser.add_argument("--max-tokens", type=int, default=common.FULL["max_tokens"],
                        help="evaluation tokens (default: the protocol's %(default)s)")
    common.add_output_arg(parser, BENCH)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    output = args.output or common.RESULTS / f"{BENCH}.jsonl"
    available = {p.stem: p for p in sorted(RECIPES.glob("*.yaml"))}
    names = [n.strip() for n in args.recipes.split(",")] if args.recipes else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: choose from {', '.join(available)}")
    model, _ = common.load_tokenizer_and_path()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="recipes-cli-") as tmp:
        for name in names:
            log.info("recipes/%s.yaml through the CLI", name)
            record = run_one(available[name], Path(model), Path(tmp), args.max_tokens)
            record.setdefault("machine", common.machine_info())
            record["versions"] = common.versions("torch", "transformers", "compressor")
            common.emit(record, output)
            failed += record["status"] != "ok" or record.get("reproduced") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
