# Quick start: `make demo` then `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Trains on the embedded sample, masks its held-out images and evaluates them (a few minutes on 2 CPUs).
demo: $(STAMP)
	rm -rf demo_out
	$(PY) jobs/train.py --name demo --storage $(CURDIR)/demo_out/runs --eval-data sample --eval-out $(CURDIR)/demo_out/eval

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
