# Every target sets up what it needs: a fresh clone only needs `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-slow check bench install install-test install-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# setup.py builds the optional extensions (daemon/stages/_requantize.c, _similarity.c): rebuilt when they change.
BUILD_INPUTS := pyproject.toml setup.py daemon/stages/_requantize.c daemon/stages/_similarity.c

$(VENV)/.installed: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-check: $(BUILD_INPUTS) | $(BIN)/python
	$(BIN)/pip install -q -e '.[check]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-check: $(VENV)/.installed-check

run: install
	$(BIN)/imgpipe run

# The slow suites (three daemons, kill -9 scenarios, fuzzing: about two minutes) run in CI, after the rest.
test: install-test
	$(BIN)/pytest -m "not slow"

test-slow: install-test
	$(BIN)/pytest -m slow

check: install-check
	$(BIN)/mypy
	$(BIN)/ruff check daemon tests bench

bench: install-test
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) imgpipe.db imgpipe.db-wal imgpipe.db-shm
