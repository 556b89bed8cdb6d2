# StepFlow developer targets. `make test` bootstraps everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# CUDA sources are compiled when torch has CUDA and nvcc is found (STEPFLOW_CUDA=0|1|auto).
export STEPFLOW_CUDA ?= auto
export MAX_JOBS ?= 2

.PHONY: venv build test test-fast test-packaging bench demo clean

venv: $(VENV)/.bootstrapped

$(VENV)/.bootstrapped: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -q ninja pybind11
	# The package and its dependencies only: `build` compiles _C once, in place.
	STEPFLOW_BUILD_EXT=0 $(PY) -m pip install --no-build-isolation -e .[dev]
	touch $@

# Incremental rebuild of stepflow_ext/_C (ninja recompiles only changed sources).
build: venv
	$(PY) setup.py -q build_ext --inplace

# The packaging test (tests/test_packaging.py: a wheel from a clean checkout, installed into a fresh
# virtualenv, ~3 min) runs last, after the rest of the suite, and always: the exit status is the worst.
test: build
	status=0; $(PY) -m pytest -q tests -m "not packaging" || status=$$?; \
	$(PY) -m pytest -q --durations=3 tests/test_packaging.py || status=$$?; exit $$status

test-fast: build
	$(PY) -m pytest -q tests -m "not packaging and not slow"

test-packaging: venv
	$(PY) -m pytest -q --durations=3 tests/test_packaging.py

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,mean,median --benchmark-sort=name

# The main job: the whole method on the embedded tiny reasoner, offline (report in runs/demo/).
demo: build
	$(VENV)/bin/stepflow demo --out runs/demo

clean:
	rm -rf build stepflow_ext/_C*.so *.egg-info
