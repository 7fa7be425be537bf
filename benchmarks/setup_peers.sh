#!/usr/bin/env bash
# Create .venv-bench: the peer venv in which llm-compressor runs for the benchmarks
# (python -m benchmarks.quant_quality / pruning / transforms start benchmarks._peer_* there).
#
# llm-compressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0,
# which conflict with the dev venv (.venv), so peers get their own venv, installed
# from the committed lock requirements/peers.lock (`make lock` refreshes it). Our own
# package is installed there too (editable, no dependencies of its own) so the peer
# runner uses the same calibration windows and the same perplexity function.
#
# Usage: bash benchmarks/setup_peers.sh [VENV_DIR]   (default: <repo>/.venv-bench)
# Idempotent: an existing venv is reused and only missing pieces are installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-bench}"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
LOCK="$ROOT/requirements/peers.lock"

if [ ! -x "$PY" ]; then
    echo "creating $VENV" >&2
    python3 -m venv "$VENV"
fi
"$PY" -m pip install -q pip==26.3
# the lock pins torch to the CPU wheel on this machine's disk (any other release is a multi-GB CUDA build)
"$PY" -m pip install -q -r "$LOCK"
"$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"

"$PY" - "$TORCH_VERSION" <<'EOF'
import sys

import torch

wanted = sys.argv[1]
if not torch.__version__.startswith(wanted) or torch.version.cuda is not None:
    sys.exit(f"torch in the peer venv is {torch.__version__} (cuda={torch.version.cuda}); "
             f"expected the CPU build {wanted}+cpu: remove the venv and run this script again")
import compressed_tensors
import llmcompressor
import transformers

import compressor

print(f"peer venv ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}, llmcompressor {llmcompressor.__version__}, "
      f"compressor from {compressor.__file__}")
EOF
