# Every target bootstraps .venv itself when it is missing or older than pyproject.toml / Makefile.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build lies on our machines' disk; on a CUDA machine use e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: lint smoke-core test test-gpu test-lower gpu-kit gpu-kit-dry gpu-kit-wheels demo bench bench-full bench-cpu soak \
	clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,demo]"
	@touch $(STAMP)

# Lint and formatting check over the whole tree (configuration: [tool.ruff] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite; Triton kernels run on the CPU under the interpreter (the flag is set before any
# kernel module is imported, here and again in tests/conftest.py).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# On a CUDA machine: the GPU-marked tests (real kernels on the device, bf16 included).
test-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# The lower end of the supported range in pyproject.toml -- torch 2.11 and triton 3.6, what the lent GPU
# machines run -- in its own environment: the compile gate (cubins triton 3.6 builds) and the kernel tests
# in the interpreter (triton 3.6's interpreter needs numpy < 2.4). The first run downloads torch's CUDA
# build from PyPI (5 GB installed, 4.5 min here); `make test` does not need it.
LOWER      := .venv-lower
LOWER_PY   := $(LOWER)/bin/python
LOWER_SPEC ?= "torch==2.11.*" "triton==3.6.*" "numpy<2.4"
LOWER_TESTS ?= tests/kernels

$(LOWER)/.installed: pyproject.toml Makefile
	@test -x $(LOWER_PY) || $(PYTHON) -m venv $(LOWER)
	$(LOWER_PY) -m pip install $(LOWER_SPEC) -e ".[dev]"
	@touch $@

# Triton 3.6's interpreter converts 1-element arrays to scalars, deprecated since NumPy 1.25 (thousands of
# warnings per run; the reason numpy < 2.4 is pinned here): silenced for this run only.
test-lower: $(LOWER)/.installed
	$(LOWER_PY) -c "import torch, triton, numpy; print('lower end:', torch.__version__, triton.__version__, numpy.__version__)"
	TRITON_INTERPRET=1 $(LOWER_PY) -m pytest -q \
		-W "ignore:Conversion of an array with ndim > 0 to a scalar is deprecated:DeprecationWarning" \
		$(LOWER_TESTS) $(PYTEST_ARGS)

# The one-shot GPU kit (benchmarks/gpu_kit.py) for a lent GPU machine: its own python3 (torch and triton
# preinstalled), no venv; monai/nibabel travel as wheels in wheels/ (`make gpu-kit-wheels` here, then carry).
# Results: one archive + manifest.json in KIT_OUT ($$OUT on the device machine). See README, "GPU kit".
KIT_OUT ?= $(or $(OUT),benchmarks/results/gpu-kit)
KIT_ARGS ?=
GPU_PYTHON ?= python3
KIT_WHEELS ?= monai==1.6.1 nibabel==5.4.2

gpu-kit:
	$(GPU_PYTHON) -m benchmarks.gpu_kit --out $(KIT_OUT) $(KIT_ARGS)

gpu-kit-dry: $(STAMP)
	$(PY) -m benchmarks.gpu_kit --dry-run --out $(KIT_OUT) $(KIT_ARGS)

# Pure-Python wheels for the GPU machine's python3 (3.12, x86-64); their other needs are installed there.
gpu-kit-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d wheels $(KIT_WHEELS)

# A core install (no extras) trains, infers and scores: its own venv, the package installed from
# this tree (not editable), run from outside it. ~2 min, most of it the first install.
CORE_VENV := .venv-core
CORE_PY   := $(CORE_VENV)/bin/python
CORE_STAMP := $(CORE_VENV)/.installed

$(CORE_STAMP): pyproject.toml Makefile
	@test -x $(CORE_PY) || $(PYTHON) -m venv $(CORE_VENV)
	@$(CORE_PY) -c "import torch" 2>/dev/null || $(CORE_PY) -m pip install -q "$(TORCH_SPEC)"
	$(CORE_PY) -m pip install -q --force-reinstall --no-deps . && $(CORE_PY) -m pip install -q .
	@touch $(CORE_STAMP)

smoke-core: $(CORE_STAMP)
	cd /tmp && TRITON_INTERPRET=1 $(abspath $(CORE_PY)) $(abspath .ci/smoke_core.py)

# The main job on the embedded default (a phantom cohort built offline).
demo: $(STAMP)
	$(PY) -m e2pa demo

bench: $(STAMP)
	$(PY) -m benchmarks

bench-full: $(STAMP)
	$(PY) -m benchmarks --full

bench-cpu: $(STAMP)
	$(PY) -m pytest -q benchmarks/test_cpu_paths.py --benchmark-only

soak: $(STAMP)
	E2PA_SOAK=1 $(PY) -m pytest -q -s tests/soak

clean-venv:
	rm -rf $(VENV)
