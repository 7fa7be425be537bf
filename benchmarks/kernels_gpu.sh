#!/usr/bin/env bash
# One GPU session's kernel checks, in order of importance, each under its own time limit:
#   1. the Triton kernel tests, compiled on the GPU (COMPRESSOR_TEST_DEVICE=cuda);
#   2. the issue's headline shapes: o_proj and down_proj, W4 g128 at every M, W2 g128;
#   3. end-to-end decode tokens/s, random-init Llama-3-8B shape, fp16 vs W4 g128;
#   4. the online Hadamard kernel vs the torch butterfly, the FP8 / NVFP4 / MXFP4 kernel vs fp16;
#   5. gemm vs dequant+cuBLAS at large M (the crossover);
#   6. the remaining shapes and bit widths.
# Uses the python3 that holds torch with CUDA and triton (no install); results (JSON lines) and logs go to
# $OUT (default out/gpu). Usage: bash benchmarks/kernels_gpu.sh [seconds-per-step-scale, default 1]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
S=${1:-1}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi -L; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } >"$OUT/env.txt" 2>&1
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$(( secs * S ))" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( SECONDS - t0 ))s" | tee -a "$OUT/steps.txt"
}
step tests 100 env COMPRESSOR_TEST_DEVICE=cuda $PY -m pytest -q -x -n 8 -p no:cacheprovider \
  tests/test_kernels/test_triton_kernels.py tests/test_kernels/test_triton_ops.py tests/test_kernels/test_triton_hadamard.py \
  tests/test_kernels/test_triton_float.py
step headline 170 $PY -m benchmarks.kernel_speed --shapes o_proj,down_proj --settings w4g128,w2g128 \
  --ms 1,16,64,256,1024 --no-e2e --output "$OUT/kernel_speed.jsonl"
step e2e 120 $PY -m benchmarks.kernel_speed --e2e-only --output "$OUT/kernel_speed.jsonl"
step hadamard 40 $PY -m benchmarks.kernel_speed --hadamard-only --repeats 20 --output "$OUT/kernel_speed.jsonl"
step float 90 $PY -m benchmarks.kernel_speed --float-only --shapes o_proj,down_proj --ms 1,16,256,1024 \
  --output "$OUT/kernel_speed.jsonl"
step crossover 60 $PY -m benchmarks.kernel_speed --shapes o_proj,down_proj --settings w4g128 --ms 256,1024,4096 \
  --paths gemm,dequant --no-e2e --output "$OUT/kernel_speed.jsonl"
step rest 60 $PY -m benchmarks.kernel_speed --shapes qkv,gate_up,o_proj,down_proj --settings w3g128,w8g128 \
  --ms 1,16,256 --no-e2e --output "$OUT/kernel_speed.jsonl"
step rest_w4 30 $PY -m benchmarks.kernel_speed --shapes qkv,gate_up --settings w4g128 --no-e2e \
  --output "$OUT/kernel_speed.jsonl"
exit 0
