#!/usr/bin/env bash
# Float weights and inputs on the shared protocol (make bench-float-inputs; about 45 minutes per setting on 2 CPU
# cores). For each setting (default: w4a4-nvfp4; SETTINGS=w4a4-nvfp4,w4a4-mxfp4,w8a8-fp8 for all) the dev split
# (SOTU 2000-2009) decides whether our GPTQ runs after a rotation (rot-gptq) or not (gptq): the lower perplexity
# there; the test split is then scored once per reported cell: our RTN, the chosen GPTQ, llm-compressor's RTN and GPTQ.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
Q="$PY -m benchmarks.quant_quality"
SETTINGS="${SETTINGS:-w4a4-nvfp4}"
choose() {  # our GPTQ method for setting $1, from the newest dev-split records
  "$PY" - "$1" <<'PY'
import json, sys
name = sys.argv[1]
recs = [json.loads(l) for l in open("benchmarks/results/quant_quality.jsonl") if l.strip()]
dev = {r["method"]: r["ppl"] for r in recs if r.get("setting") == name and (r.get("protocol") or {}).get("split") == "dev"
       and r.get("status") == "ok" and not (r.get("protocol") or {}).get("quick")}
print("rot-gptq" if dev.get("rot-gptq", 1e9) < dev.get("gptq", 1e9) else "gptq")
PY
}
$Q --methods fp32 --settings "${SETTINGS%%,*}"
for S in ${SETTINGS//,/ }; do
  $Q --split dev --settings "$S" --methods gptq,rot-gptq
  G=$(choose "$S")
  echo "dev split chose: $S -> $G" >&2
  $Q --settings "$S" --methods "rtn,$G,llmc-rtn,llmc-gptq"
done
