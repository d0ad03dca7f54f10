# Every target bootstraps .venv itself when it is missing or older than pyproject.toml / Makefile.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build lies on our machines' disk; on a CUDA machine use e.g. `make TORCH_SPEC=torch test`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test test-gpu demo bench bench-full bench-cpu soak clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,demo]"
	@touch $(STAMP)

# The whole suite; Triton kernels run on the CPU under the interpreter (the flag is set before any
# kernel module is imported, here and again in tests/conftest.py).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# On a CUDA machine: the GPU-marked tests (real kernels on the device, bf16 included).
test-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

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
