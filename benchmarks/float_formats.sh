#!/usr/bin/env bash
# FP8 / NVFP4 / MXFP4 weights on the shared protocol (make bench-float, about 70 minutes on 2 CPU cores):
# the dev split (SOTU 2000-2009) decides, per FP4 format, whether our GPTQ searches its scales (observer mse: used
# when RTN with MSE scales beats plain RTN by 1% or more there); the test split is then scored once per setting:
# fp32, our RTN (both observers), the chosen GPTQ, and llm-compressor's RTN and GPTQ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
Q="$PY -m benchmarks.quant_quality"
$Q --split dev --settings nvfp4,mxfp4 --methods rtn,rtn-mse
G_NV=$("$PY" -m benchmarks.dev_choice nvfp4 rtn rtn-mse --margin 0.01 --pick gptq,gptq-mse)
G_MX=$("$PY" -m benchmarks.dev_choice mxfp4 rtn rtn-mse --margin 0.01 --pick gptq,gptq-mse)
echo "dev split chose: nvfp4 -> $G_NV, mxfp4 -> $G_MX" >&2
$Q --methods fp32 --settings nvfp4
$Q --settings nvfp4 --methods "rtn,rtn-mse,llmc-rtn,$G_NV,llmc-gptq"
$Q --settings mxfp4 --methods "rtn,rtn-mse,llmc-rtn,$G_MX,llmc-gptq"
$Q --settings fp8 --methods rtn,rtn-mse,llmc-rtn
