#!/usr/bin/env bash
# Float weights and inputs on the shared protocol (make bench-float-inputs; about 45 minutes per setting on 2 CPU
# cores). For each setting (default: w4a4-nvfp4; SETTINGS=w4a4-nvfp4,w4a4-mxfp4,w8a8-fp8 for all) the dev split
# (SOTU 2000-2009) decides which of our three GPTQ recipes is scored: GPTQ before the input quantizers (gptq), the
# same after a rotation (rot-gptq), or GPTAQ after the input quantizers (qa-gptaq): the lowest perplexity there.
# The test split is then scored once per reported cell: our RTN, the chosen recipe, llm-compressor's RTN and GPTQ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
Q="$PY -m benchmarks.quant_quality"
SETTINGS="${SETTINGS:-w4a4-nvfp4}"
$Q --methods fp32 --settings "${SETTINGS%%,*}"
for S in ${SETTINGS//,/ }; do
  $Q --split dev --settings "$S" --methods gptq,rot-gptq,qa-gptaq
  G=$("$PY" -m benchmarks.dev_choice "$S" gptq rot-gptq)
  G=$("$PY" -m benchmarks.dev_choice "$S" "$G" qa-gptaq)
  echo "dev split chose: $S -> $G" >&2
  $Q --settings "$S" --methods "rtn,$G,llmc-rtn,llmc-gptq"
done
