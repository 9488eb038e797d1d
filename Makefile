# `make demo` and `make test` work on a fresh machine: each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch, installed into .venv before the package. By default the pin below from your pip index (PyPI): on Linux
# that is the CUDA build (it runs on the CPU too, and pulls several GB of NVIDIA libraries); on macOS (Apple silicon)
# and Windows it is the CPU build. For the CPU-only Linux build (a few hundred MB), name PyTorch's CPU index:
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
# The choice is remembered in .venv/torch.mk, so a plain `make` keeps it; a new TORCH_SPEC or TORCH_INDEX
# reinstalls torch in the existing .venv at the next make (no `make clean`).
-include $(VENV)/torch.mk
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_FROM := $(if $(TORCH_INDEX),$(TORCH_INDEX),your pip index (PyPI: CUDA build on Linux; CPU-only: make TORCH_INDEX=https://download.pytorch.org/whl/cpu))
# One stamp per choice, so that a new TORCH_SPEC or TORCH_INDEX is a target not yet made.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s|%s' '$(TORCH_SPEC)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)

.PHONY: demo test lint format clean help
.DELETE_ON_ERROR:

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/pip:  # a venv left half-made (e.g. no python3-venv package) is removed, so the next make starts again
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "make: phi3v-tools needs \
	Python 3.10 or later; $(PYTHON) is $$($(PYTHON) --version 2>&1). Name another: make PYTHON=python3.12 demo"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: $(PYTHON) -m venv failed (on Debian/Ubuntu: \
	apt install python3-venv)"; exit 1; }
	$(BIN)/pip install --quiet --upgrade pip || { rm -rf $(VENV); exit 1; }

$(TORCH_STAMP): | $(BIN)/pip
	@echo "make: installing $(TORCH_SPEC) from $(TORCH_FROM)"
	@if ls $(VENV)/.torch-* >/dev/null 2>&1; then rm -f $(VENV)/.torch-* && $(BIN)/pip uninstall --quiet --yes torch; fi
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	@printf 'TORCH_SPEC ?= %s\nTORCH_INDEX ?= %s\n' '$(TORCH_SPEC)' '$(TORCH_INDEX)' > $(VENV)/torch.mk
	touch $@

$(BIN)/phi3v-tools: pyproject.toml $(TORCH_STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/phi3v-tools  ## the seed notebook's three tasks and a table; tiny offline model unless PHI3V_MODEL is set
	$(BIN)/phi3v-tools demo

test: $(BIN)/phi3v-tools  ## the test suite (offline, CPU)
	$(BIN)/python -m pytest -q

lint: $(BIN)/phi3v-tools  ## ruff, format check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(BIN)/phi3v-tools  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
