# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,api,mqtt,supervisor,schedules,postgres]'
	touch $(STAMP)

run: $(STAMP)  ## the quick-start demo: the worker runs example pipelines on embedded SQLite
	$(BIN)/python scripts/demo.py

smoke: $(STAMP)
	$(BIN)/python scripts/test_queue.py $(URL)

test: $(STAMP)  ## the whole suite: lint, types, tests against real Redis
	$(BIN)/python -m ruff check src tests scripts examples worker.py
	$(BIN)/python -m ruff format --check src tests scripts examples worker.py
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests scripts examples worker.py
	$(BIN)/python -m mypy

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
