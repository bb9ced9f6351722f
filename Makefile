# Fresh machine: `make test` or `make demo` create .venv, install the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python -m pipeline.demo

bench: install
	$(BIN)/python benchmarks/scan.py
	$(BIN)/python benchmarks/featurize.py

clean:
	rm -rf $(VENV) .pytest_cache
