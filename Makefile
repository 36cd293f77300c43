# tadistill: set-up and entry points. On a fresh machine `make demo` and `make test` do everything.
#
# torch: a bare `torch` from PyPI is a CUDA build of several GB, so on machines without an NVIDIA GPU
# the CPU build is installed first (PyTorch's +cpu wheel: from a local wheel folder when pip has one,
# else from PyTorch's CPU index). Choose otherwise with, for example:
#   make install TORCH="torch==2.5.1"                      # any build pip resolves
#   make install TORCH="torch" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH ?= torch
else
TORCH ?= torch==$(TORCH_VERSION)+cpu
endif
TORCH_INDEX ?=
CPU_INDEX := --index-url https://download.pytorch.org/whl/cpu
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, so that the dependencies of tadistill do not pull a CUDA build.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null \
	  || $(BIN)/pip install "$(TORCH)" $(TORCH_INDEX) \
	  || $(BIN)/pip install "torch==$(TORCH_VERSION)" $(CPU_INDEX)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Distill the built-in teacher (all-MiniLM-L6-v2) into a 3-layer student with minilmv2.
demo: install
	$(BIN)/tadistill demo $(ARGS)

# The test suite (what CI runs through .ci/run).
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
