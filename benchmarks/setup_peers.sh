#!/usr/bin/env bash
# Create .venv-bench: the peer venv in which llm-compressor runs for benchmarks/quant_quality.py.
#
# llm-compressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0,
# which conflict with the dev venv (.venv), so peers get their own venv. Our own
# package is installed there too (editable) so the peer runner uses the same
# calibration windows and the same perplexity function.
#
# Usage: bash benchmarks/setup_peers.sh [VENV_DIR]   (default: <repo>/.venv-bench)
# Idempotent: an existing venv is reused and only missing pieces are installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-bench}"
PY="$VENV/bin/python"
TORCH_VERSION="2.13.0"
LLMC_VERSION="0.14.0.1"

if [ ! -x "$PY" ]; then
    echo "creating $VENV" >&2
    python3 -m venv "$VENV"
fi
"$PY" -m pip install -q --upgrade pip
# torch FIRST, pinned: the CPU wheel on this machine's disk. Letting a later
# install resolve torch would pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==$TORCH_VERSION"
"$PY" -m pip install -q -e "$ROOT"
# Keep torch where it is while llm-compressor resolves its own pins.
"$PY" -m pip install -q "llmcompressor==$LLMC_VERSION" "torch==$TORCH_VERSION"

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
