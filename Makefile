# Fresh machine: `make test` or `make demo` create .venv, install the project, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-unit lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Two pytest workers: most of an integration test's time is spent waiting (Ray starting processes,
# trainers polling, services coming up), so two at once fill a 2-core machine. Tests that share a
# costly module fixture run on one worker (pytest.mark.xdist_group).
test: install            # everything: unit and integration tests (what CI runs, after lint)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=20

test-unit: install       # the fast loop: every service-free test, under two minutes on 2 cores
	$(BIN)/python -m pytest -n 2 tests/unit

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/python -m pipeline.demo

bench: install
	$(BIN)/python benchmarks/scan.py
	$(BIN)/python benchmarks/featurize.py

clean:
	rm -rf $(VENV) .pytest_cache
