# Two commands set everything up on a fresh machine (see README.md):
#   make train   -> venv + install + the default job (synthetic phantoms, CPU)
#   make test    -> venv + install with the test extra + lint/format check (ruff) + the test suite
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

.PHONY: install install-test train test
install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"

train: install
	$(BIN)/python -m clips_jax.train

test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 tests
