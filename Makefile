# One command to set up and run everything on a fresh machine (Python 3.11, no GPU needed).
#   make repro   -> .venv + `dvc repro` of the whole pipeline on the bundled sample characters (offline)
#   make test    -> .venv + every test (fast and slow)
#   make test-fast, make bench, make samples
#   make deps    -> rewrite dvc.yaml's code deps from each stage's import closure (run after changing imports)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: setup repro test test-fast bench samples deps clean-venv gpu-wheels gpu-smoke

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build here; a loose requirement would pull multi-GB CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ssh,ray]'
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
	$(PY) -m chibisplat.tools.samples --out data/assets

# dvc.yaml lists, per stage, exactly the code files it can import (tests/test_dvc_deps.py fails when it does not).
deps: $(STAMP)
	$(PY) -m chibisplat.tools.dvc_deps --write

clean-venv:
	rm -rf $(VENV)

# The real path on a CUDA GPU (README "GPU smoke"). `make gpu-wheels` here (PyPI access) fills .gpu-wheels/ with the
# Python 3.12 manylinux wheels a GPU machine may lack; carry that folder to the GPU machine, then `make gpu-smoke`
# there (its Python already has torch + CUDA). Without CUDA the script prints that it skipped and exits 0.
GPU_WHEELS ?= .gpu-wheels
SMOKE_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-wheels:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
		-d $(GPU_WHEELS) -r benchmarks/gpu_wheels.txt

gpu-smoke:
	$(SMOKE_PY) benchmarks/gpu_smoke.py --wheels $(GPU_WHEELS)
