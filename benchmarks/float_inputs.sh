#!/usr/bin/env bash
# Float weights and inputs on the shared protocol (make bench-float-inputs; about 3 hours per setting on 2 CPU
# cores, llm-compressor's GPTQ about one of them). For each setting (default: w4a4-nvfp4;
# SETTINGS=w4a4-nvfp4,w4a4-mxfp4,w8a8-fp8 for all) the dev split
# (SOTU 2000-2009) decides which of our GPTQ recipes is scored: GPTQ before the input quantizers (gptq), the
# same after a rotation (rot-gptq), GPTAQ after the input quantizers (qa-gptaq) or, for the FP4 formats, the same
# after block rotations of the input group's size (bh-qa-gptaq), or after AWQ's scales searched with the inputs
# quantized (awqa-qa-gptaq; for the FP4 formats also with GPTQ's group scales searched, awqa-qa-gptaq-mse): the
# lowest perplexity there. The block-rotated
# RTN (bh-rtn) is scored beside RTN when it won on the dev split.
# The test split is then scored once per reported cell: our RTN, the chosen recipe, llm-compressor's RTN and GPTQ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
Q="$PY -m benchmarks.quant_quality"
SETTINGS="${SETTINGS:-w4a4-nvfp4}"
$Q --methods fp32 --settings "${SETTINGS%%,*}"
for S in ${SETTINGS//,/ }; do
  $Q --split dev --settings "$S" --methods gptq,rot-gptq,qa-gptaq,awqa-qa-gptaq
  G=$("$PY" -m benchmarks.dev_choice "$S" gptq rot-gptq)
  G=$("$PY" -m benchmarks.dev_choice "$S" "$G" qa-gptaq)
  G=$("$PY" -m benchmarks.dev_choice "$S" "$G" awqa-qa-gptaq)
  RTN=rtn
  if [ "$S" != w8a8-fp8 ]; then  # grouped FP4 inputs: MR-GPTQ's block rotations (hadamard_inputs) too
    $Q --split dev --settings "$S" --methods rtn,bh-rtn,bh-qa-gptaq
    RTN=rtn,$("$PY" -m benchmarks.dev_choice "$S" rtn bh-rtn | sed 's/^rtn$//')
    G=$("$PY" -m benchmarks.dev_choice "$S" "$G" bh-qa-gptaq)
    $Q --split dev --settings "$S" --methods awqa-qa-gptaq-mse
    G=$("$PY" -m benchmarks.dev_choice "$S" "$G" awqa-qa-gptaq-mse)
  fi
  echo "dev split chose: $S -> $G" >&2
  $Q --settings "$S" --methods "${RTN%,},$G,llmc-rtn,llmc-gptq"
done
