# The two commands of the README: `make demo` and `make test`. Both install into ./.venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kdpipe-installed
NATIVE := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install build demo test lint bench clean

install: $(STAMP)

# torch first, pinned (constraints.txt): any open torch range would download a CUDA build.
$(STAMP): pyproject.toml CMakeLists.txt constraints.txt $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[cpu,dev,demo,tensorboard]"
	# onnx2torch (the differentiable teacher replica of --targets grad) declares torchvision, which
	# would pull a CUDA torch: installed without its dependencies (numpy, onnx, torch are already here).
	$(PIP) install -q -c constraints.txt --no-deps onnx2torch==1.5.15
	$(PY) -m kdpipe doctor --quiet
	touch $(STAMP)

# Fast rebuild of the native module after editing csrc/ (reuses build/).
build:
	$(PIP) install -q -c constraints.txt "scikit-build-core>=0.10" "pybind11>=2.12"
	$(PIP) install -q -c constraints.txt --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash pipelines/demo/run.sh

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: install
	$(VENV)/bin/ruff check kdpipe tests bench pipelines
	$(VENV)/bin/ruff format --check kdpipe tests bench pipelines
	$(VENV)/bin/mypy kdpipe

bench: install
	$(PY) bench/ops.py
	$(PY) bench/cache_teacher.py
	$(PY) bench/distill.py
	$(PY) bench/losses.py

clean:
	rm -rf build $(VENV) .pytest_cache .mypy_cache .ruff_cache
