"""Our GGUF exports against llama.cpp's own quantizer, on the same fp32 SmolLM2 and the same calibration text.

    python -m benchmarks.gguf_compare                 # Q4_K_M: llama-quantize with / without imatrix, ours nearest / GPTQ
    python -m benchmarks.gguf_compare --mix Q3_K_M    # any mix of compressor.core.gguf_blocks.MIXES
    python -m benchmarks.gguf_compare --quick         # smoke run: 8 calibration windows, 4 perplexity chunks
    python -m benchmarks.gguf_compare --quick --check --variants f32,llama.cpp,ours-gptq   # make gguf-check (CI)

llama.cpp's tools come from ``make llama-tools`` (``benchmarks/setup_llama_cpp.sh`` builds ``llama-quantize``,
``llama-imatrix`` and ``llama-perplexity`` from the llama.cpp that llama-cpp-python 0.3.36 vendors, into
``.llama/bin``). For each variant the benchmark records:

* **llama.cpp's perplexity**: ``llama-perplexity -c 512 --chunks 64`` on SOTU 2010-2021 (llama.cpp tokenizes the
  text itself and scores the second half of each 512-token chunk: its own protocol);
* **our protocol's perplexity** (DESIGN.md: the first 32768 tokens in windows of 512): the file read back by
  gguf's dequantizer into the fp32 model (:func:`compressor.export.gguf.load_gguf_weights`);
* **llama.cpp's protocol in our loader** (:func:`llama_protocol_ppl`): the same read-back model scored as
  llama-perplexity scores, on our tokenization: equal to llama.cpp's figure up to its arithmetic (its quantized
  matmuls round the activations to 8 bits) when llama.cpp reads the file as we mean it (tokenizer, q/k row order,
  formats);
* file size, and the time to quantize (ours: the calibrated pass plus writing; llama.cpp: llama-imatrix plus
  llama-quantize, each with 2 threads).

Variants: ``f32`` (our unquantized GGUF, llama-quantize's input: its tensors are bit-identical to what
llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` writes, checked by hand), ``llama.cpp`` and
``llama.cpp+imatrix`` (``llama-quantize [--imatrix] f32.gguf out.gguf Q4_K_M``; the imatrix from
``llama-imatrix -c 512`` over our 128 calibration windows decoded to text), ``ours-nearest`` (our scale search
with the imatrix as weights, nearest codes: llama-quantize --imatrix's method) and ``ours-gptq`` (the same
scales, GPTQ's codes). Every variant's tensor formats are checked equal to llama-quantize's.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.gguf_compare")

BENCH = "gguf"
LLAMA_BIN = common.ROOT / ".llama" / "bin"
WORK = common.ROOT / "out" / "gguf"
VARIANTS = ("f32", "llama.cpp", "llama.cpp+imatrix", "ours-nearest", "ours-gptq")
# --check: llama.cpp's perplexity against our loader's on its protocol, relative. F32 files must agree to float
# rounding (measured 6e-5); quantized ones differ by llama.cpp's 8-bit rounding of the activations in its
# quantized matmuls (measured 0.4-0.7% on SmolLM2 Q4_K_M, 4 chunks)
CHECK_TOLERANCE = {"F32": 0.001, "quantized": 0.015}


def run(cmd: list[str], log_path: Path) -> float:
    """Run a llama.cpp tool, its output to ``log_path``; seconds taken. Raises on failure with the log's tail."""
    t = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{tail}")
    return time.perf_counter() - t


def llama_ppl(bin_dir: Path, path: Path, text: Path, chunks: int, work: Path) -> float:
    """``llama-perplexity -c 512 --chunks N``'s final estimate."""
    logf = work / f"{path.stem}.ppl.log"
    run([str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", str(common.CTX),
         "--chunks", str(chunks), "-t", "2", "-b", "512"], logf)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", logf.read_text(encoding="utf-8", errors="replace"))
    if not found:
        raise RuntimeError(f"no final perplexity in {logf}")
    return float(found.group(1))


def llama_protocol_ppl(model, ids, chunks: int) -> float:
    """llama-perplexity's protocol in our loader: chunk ``j`` is tokens ``[512 j, 512 (j + 1))``, and only the
    tokens after its first half are scored (255 per chunk; ``tools/perplexity/perplexity.cpp``, ``first =
    n_ctx / 2``); SmolLM2's GGUF says add_bos false, so no token is replaced by BOS."""
    import torch

    first, nll, count = common.CTX // 2, 0.0, 0
    with torch.no_grad():
        for j in range(min(chunks, ids.numel() // common.CTX)):
            x = ids[j * common.CTX:(j + 1) * common.CTX]
            logp = torch.log_softmax(model(x[None]).logits[0, first:-1].double(), -1)
            nll -= float(logp.gather(1, x[first + 1:, None]).sum())
            count += common.CTX - first - 1
    return float(torch.tensor(nll / count).exp())


def formats(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", default="Q4_K_M", help="llama-quantize mix (compressor.core.gguf_blocks.MIXES: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, ...)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="llama.cpp tools (make llama-tools)")
    parser.add_argument("--split", choices=("test", "dev"), default="test")
    parser.add_argument("--quick", action="store_true", help="8 calibration windows, 4 chunks, 2048 tokens")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a gguf pass option for our variants, e.g. refit_scales=true (dev-split runs choose "
                        "them; records with --set are not reported)")
    parser.add_argument("--skip-llama-ppl", action="store_true", help="only our protocol's perplexity (dev runs)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless every variant ran and llama.cpp's "
                        "perplexity matches our loader's on llama.cpp's protocol (CHECK_TOLERANCE)")
    common.add_output_arg(parser, BENCH)
    args = parser.parse_args(argv)
    common.setup_logging()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}: use {VARIANTS}")
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        if not (args.llama_bin / tool).is_file():
            parser.error(f"{args.llama_bin / tool} does not exist: run `make llama-tools` (or pass --llama-bin)")

    import torch

    from compressor.api import compress
    from compressor.calibration import load_text
    from compressor.export.gguf import load_gguf_weights, save_gguf
    from compressor.recipe import Recipe, load_yaml

    options = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: use KEY=VALUE")
        options[key] = load_yaml(value)
    size = common.QUICK if args.quick else common.FULL
    chunks = 4 if args.quick else size["max_tokens"] // common.CTX
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    output = common.output_path(args, BENCH)
    source, tokenizer = common.load_tokenizer_and_path()
    calib = common.calibration_ids(tokenizer, size["n_calib"], size["calib_len"])
    eval_text = work / f"eval-{args.split}.txt"
    eval_text.write_text(load_text(common.SPLITS[args.split]), encoding="utf-8")
    ids = common.eval_ids(tokenizer, args.split)

    f32 = work / "f32.gguf"
    t = time.perf_counter()
    save_gguf(common.load_fp32_model(source), f32, tokenizer=tokenizer, mix="F32", overwrite=True, quiet=True)
    f32_s = time.perf_counter() - t
    imatrix = work / "imatrix.gguf"
    imatrix_s = None

    def make_imatrix() -> float:
        text = work / "calib.txt"  # our calibration windows, decoded: llama-imatrix cuts them into 512-token chunks
        text.write_text("".join(tokenizer.decode(row) for row in calib.input_ids.tolist()), encoding="utf-8")
        return run([str(args.llama_bin / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-c",
                    str(size["calib_len"]), "--chunks", str(size["n_calib"]), "-t", "2", "-o", str(imatrix)],
                   work / "imatrix.log")

    reference_formats = None
    failed = []
    for variant in variants:
        record: dict[str, Any] = {"bench": BENCH, "model": common.MODEL_NAME, "variant": variant,
                                  "mix": "F32" if variant == "f32" else args.mix, "split": args.split,
                                  "n_calib": size["n_calib"], "calib_len": size["calib_len"], "chunks": chunks,
                                  "max_tokens": size["max_tokens"], "quick": args.quick,
                                  "set": options if variant.startswith("ours") else {}}
        path = work / f"{variant.replace('+', '-')}.gguf"
        try:
            if variant == "f32":
                path, seconds = f32, f32_s
            elif variant.startswith("llama.cpp"):
                seconds = 0.0
                cmd = [str(args.llama_bin / "llama-quantize")]
                if variant.endswith("imatrix"):
                    if imatrix_s is None:
                        imatrix_s = make_imatrix()
                    seconds += imatrix_s
                    cmd += ["--imatrix", str(imatrix)]
                seconds += run(cmd + [str(f32), str(path), args.mix, "2"], work / f"{path.stem}.log")
            else:
                method = variant.split("-", 1)[1]
                model = common.load_fp32_model(source)
                recipe = Recipe.from_dict({"passes": [{"gguf": {"mix": args.mix, "method": method} | options}]})
                record["config"] = recipe.passes[0][1].to_dict()
                t = time.perf_counter()
                compress(model, recipe, calibration=calib, tokenizer=tokenizer, output=path, overwrite=True,
                         quiet=True)
                seconds = time.perf_counter() - t
            kinds = formats(path)
            if variant != "f32":
                if reference_formats is None and variant.startswith("llama.cpp"):
                    reference_formats = kinds
                if reference_formats is not None and kinds != reference_formats:
                    diff = [n for n in kinds if kinds[n] != reference_formats.get(n)][:4]
                    raise RuntimeError(f"tensor formats differ from llama-quantize's: {diff}")
            model = common.load_fp32_model(source)
            load_gguf_weights(model, path)
            with torch.no_grad():
                ours = common.perplexity(model, ids, size["max_tokens"])
                ours_llama = None if args.skip_llama_ppl else llama_protocol_ppl(model, ids, chunks)
            record.update({"file_bytes": path.stat().st_size, "quantize_s": round(seconds, 1),
                           "ppl_llama_cpp": None if args.skip_llama_ppl
                           else llama_ppl(args.llama_bin, path, eval_text, chunks, work),
                           "ppl_llama_protocol_ours": None if ours_llama is None else round(ours_llama, 4),
                           "ppl": ours["ppl"], "eval_tokens": ours["eval_tokens"],
                           "formats": {k: sum(1 for v in kinds.values() if v == k) for k in sorted(set(kinds.values()))},
                           "status": "ok"})
        except (RuntimeError, OSError, ValueError) as err:
            record["status"] = f"error: {common.error_text(err, 600)}"
        record["versions"] = common.versions("gguf", "torch", "transformers") | {"llama.cpp": "llama-cpp-python 0.3.36"}
        if record["status"] == "ok" and record.get("ppl_llama_protocol_ours"):
            rel = record["ppl_llama_cpp"] / record["ppl_llama_protocol_ours"] - 1
            tol = CHECK_TOLERANCE["F32" if variant == "f32" else "quantized"]
            record["llama_cpp_vs_ours"] = round(rel, 6)
            if abs(rel) > tol:
                record["status"] = f"fail: llama.cpp's perplexity is {rel:+.2%} off our loader's (tolerance {tol:.1%})"
        common.emit(record, output)
        if record["status"] != "ok":
            failed.append(f"{variant}: {record['status']}")
    for line in failed:
        log.error(line)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
