# Every target installs what it needs into .venv first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench smoke clean bytecode

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,api,mqtt,supervisor,schedules,postgres]'
	touch $(STAMP)

# Compiled bytecode for the project's own modules, written even where the environment sets
# PYTHONDONTWRITEBYTECODE (an editable install has none otherwise): every worker process
# would compile about 70 modules at start, 0.1 s of each start-up. Only what changed is
# compiled again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src scripts

run: $(STAMP) bytecode  ## the quick-start demo: the worker runs example pipelines on embedded SQLite
	$(BIN)/python scripts/demo.py

smoke: $(STAMP) bytecode
	$(BIN)/python scripts/test_queue.py $(URL)

test: $(STAMP) bytecode  ## the whole suite: lint, types, tests against real Redis
	$(BIN)/python -m ruff check src tests scripts examples worker.py
	$(BIN)/python -m ruff format --check src tests scripts examples worker.py
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests scripts examples worker.py
	$(BIN)/python -m mypy

bench: $(STAMP) bytecode
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
