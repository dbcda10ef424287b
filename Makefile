# The two commands a new user needs: `make quickstart` and `make test`.
# Both create .venv on first use. torch is installed first and pinned, because an unpinned
# torch pulls a multi-GB CUDA build; on these machines 2.13.0 is a CPU wheel on local disk.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart lint test test-integration test-slow test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: install
	$(BIN)/flexkd run pipelines/quickstart.yaml

# Lint, format and the import layers (pyproject.toml [tool.ruff], [tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: install
	$(BIN)/python -m pytest

test-integration: install
	$(BIN)/python -m pytest -m integration

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: install
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf runs .pytest_cache
