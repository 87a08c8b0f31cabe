# Quick start: `make demo` then `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

REMBG_VENV := .venv-rembg
REMBG_VERSION := 2.0.86
REMBG_STAMP := $(REMBG_VENV)/.installed-$(REMBG_VERSION)

.PHONY: demo test install browser rembg clean

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

# rembg from PyPI, which a test runs on this project's ONNX export, in an environment of its own: it needs
# scikit-image 0.26 (pysodmetrics, in .venv, wants < 0.26) and its command line pins fastapi below Ray Serve's.
# Python 3.11 or newer (rembg's own requirement). The stamp names the version: a new pin reinstalls.
# rembg's first import compiles pymatting's numba kernels into their cache (55 s here, 1.5 s after):
# done once here, not inside the first test that runs it.
$(REMBG_STAMP):
	$(PYTHON) -m venv $(REMBG_VENV)
	$(REMBG_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(REMBG_VENV)/bin/python -m pip install --quiet 'rembg[cpu,cli]==$(REMBG_VERSION)'
	$(REMBG_VENV)/bin/python -c "import rembg.bg"
	touch $(REMBG_STAMP)

rembg: $(REMBG_STAMP)

test: $(STAMP) browser $(REMBG_STAMP)
	$(PY) -m pytest -q --durations=10 tests

clean:
	rm -rf $(VENV) $(REMBG_VENV) demo_out runs .pytest_cache
