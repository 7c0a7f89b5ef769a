# One command to set up and run everything on a fresh machine (Python 3.11, no GPU needed).
#   make repro   -> .venv + `dvc repro` of the whole pipeline on the bundled sample characters (offline)
#   make test    -> .venv + every test (fast and slow)
#   make test-fast, make bench, make samples
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup repro test test-fast bench samples clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build here; a loose requirement would pull multi-GB CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ssh]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Stage commands call `python`: the venv's bin comes first on PATH (the same as `source .venv/bin/activate`).
repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro

test: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" -v --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

samples: $(STAMP)
	$(PY) -m chibisplat.samples --out data/assets

clean-venv:
	rm -rf $(VENV)
