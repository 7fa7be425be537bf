#!/usr/bin/env bash
# Create a peer venv in which a peer toolkit runs for the benchmarks
# (python -m benchmarks.quant_quality / pruning / transforms start benchmarks._peer_* there).
#
# Peers (each in a venv of its own, installed from its committed lock; `make lock` refreshes them):
#   llmcompressor  .venv-bench      requirements/peers.lock      llm-compressor 0.14.0.1, which pins
#                                                                transformers<=5.17.0 and compressed-tensors==0.19.0
#                                                                (they conflict with the dev venv .venv)
#   autoround      .venv-autoround  requirements/autoround.lock  Intel's auto-round 0.16.1
#   gptqmodel      .venv-gptqmodel  requirements/gptqmodel.lock  ModelCloud's GPTQModel 7.6.0 (7.7.0 needs torch>=2.14.1);
#                                                                sdists only: its install builds pypcre (~minutes)
# Our own package is installed there too (editable, no dependencies of its own) so the peer
# runner uses the same calibration windows and the same perplexity function.
#
# Usage: bash benchmarks/setup_peers.sh [PEER] [VENV_DIR]   (default PEER: llmcompressor; VENV_DIR as above)
# Idempotent: an existing venv is reused and only missing pieces are installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER="llmcompressor"
case "${1:-}" in
    llmcompressor|autoround|gptqmodel) PEER="$1"; shift ;;
esac
case "$PEER" in
    llmcompressor) VENV_NAME=".venv-bench"; LOCK="$ROOT/requirements/peers.lock"; MODULES="compressed_tensors llmcompressor" ;;
    autoround) VENV_NAME=".venv-autoround"; LOCK="$ROOT/requirements/autoround.lock"; MODULES="auto_round" ;;
    gptqmodel) VENV_NAME=".venv-gptqmodel"; LOCK="$ROOT/requirements/gptqmodel.lock"; MODULES="gptqmodel" ;;
esac
VENV="${1:-$ROOT/$VENV_NAME}"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"

if [ ! -x "$PY" ]; then
    echo "creating $VENV" >&2
    python3 -m venv "$VENV"
fi
"$PY" -m pip install -q pip==26.3
# the lock pins torch to the CPU wheel on this machine's disk (any other release is a multi-GB CUDA build)
"$PY" -m pip install -q -r "$LOCK"
"$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"

"$PY" - "$TORCH_VERSION" $MODULES <<'PYEOF'
import importlib
import importlib.metadata
import sys

import torch

wanted, modules = sys.argv[1], sys.argv[2:]
if not torch.__version__.startswith(wanted) or torch.version.cuda is not None:
    sys.exit(f"torch in the peer venv is {torch.__version__} (cuda={torch.version.cuda}); "
             f"expected the CPU build {wanted}+cpu: remove the venv and run this script again")
import transformers

import compressor

found = ", ".join(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}" for m in modules)
print(f"peer venv ready: torch {torch.__version__}, transformers {transformers.__version__}, {found}, "
      f"compressor from {compressor.__file__}")
PYEOF
