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
choose() {  # our GPTQ method for format $1, from the newest dev-split records
  "$PY" - "$1" <<'PY'
import json, sys
fmt = sys.argv[1]
recs = [json.loads(l) for l in open("benchmarks/results/quant_quality.jsonl") if l.strip()]
dev = {r["method"]: r["ppl"] for r in recs if r.get("setting") == fmt and (r.get("protocol") or {}).get("split") == "dev"
       and r.get("status") == "ok" and not (r.get("protocol") or {}).get("quick")}
print("gptq-mse" if dev.get("rtn-mse", 1e9) < 0.99 * dev.get("rtn", 1e9) else "gptq")
PY
}
G_NV=$(choose nvfp4)
G_MX=$(choose mxfp4)
echo "dev split chose: nvfp4 -> $G_NV, mxfp4 -> $G_MX" >&2
$Q --methods fp32 --settings nvfp4
$Q --settings nvfp4 --methods "rtn,rtn-mse,llmc-rtn,$G_NV,llmc-gptq"
$Q --settings mxfp4 --methods "rtn,rtn-mse,llmc-rtn,$G_MX,llmc-gptq"
$Q --settings fp8 --methods rtn,rtn-mse,llmc-rtn
