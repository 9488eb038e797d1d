# `make demo` and `make test` work on a fresh machine: each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch (a plain `pip install torch` pulls a multi-GB CUDA build). Override on a GPU box:
#   make TORCH_SPEC='torch' demo
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint format clean help

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/phi3v-tools: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
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
