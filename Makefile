# Quick start: `make demo` then `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,onnx,tracking]'
	touch $(STAMP)

install: $(STAMP)

# Trains on the embedded sample, masks its held-out images and evaluates them (a few minutes on 2 CPUs).
demo: $(STAMP)
	rm -rf demo_out
	$(PY) jobs/train.py --name demo --storage $(CURDIR)/demo_out/runs --eval-data sample --eval-out $(CURDIR)/demo_out/eval

# The masking page's test drives a real headless Chromium: Debian's package (Playwright drives it as is,
# nothing is downloaded). Installed once, with sudo when not root.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=10 tests

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache
