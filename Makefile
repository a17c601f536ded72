# One target per habit, the same locally and in CI.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast lint layers typecheck demo bench

install:
	./scripts/install.sh

test: install layers
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow and not e2e"

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

layers:
	$(VENV)/bin/lint-imports

typecheck:
	$(VENV)/bin/mypy

demo: install
	$(VENV)/bin/fleet demo

bench:
	$(PY) -m bench.overhead
