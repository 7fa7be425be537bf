#!/usr/bin/env bash
# llama.cpp's own tools for benchmarks/gguf_compare.py: llama-quantize, llama-imatrix and llama-perplexity,
# built from the llama.cpp that llama-cpp-python 0.3.36 vendors (the sdist is on PyPI; llama.cpp has no wheel),
# into .llama/bin. About 5 minutes on 2 cores.
#
# The flags: a portable AVX2 build. The default native build detects AMX on this VM's CPU and dies with SIGSEGV
# on the first evaluation (issue 26); AVX-512 is off so the same build runs on the AVX2-only machines CI sometimes
# gets.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
DEST=.llama
SRC="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$DEST/src"
if [ ! -d "$SRC" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST/src"
    tar xzf "$DEST/src/llama_cpp_python-$VERSION.tar.gz" -C "$DEST/src"
fi
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TOOLS=ON > "$DEST/cmake.log"
cmake --build "$DEST/build" -j "$(nproc)" --target llama-quantize llama-imatrix llama-perplexity > "$DEST/build.log"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-quantize" "$DEST/build/bin/llama-imatrix" "$DEST/build/bin/llama-perplexity" "$DEST/bin/"
echo "llama.cpp tools in $DEST/bin"
