# The two commands a fresh machine needs (see README):
#   make demo   create .venv, install, build, run APL end to end, write a report
#   make test   create .venv, install, build, run the whole test suite (what .ci/run calls)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.apl-installed
DEMO_OUT ?= demo-out
# The CPU wheel of torch 2.13.0 lies on disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: venv install build test test-fast demo cuda-check gpu-check lint typecheck bench world clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q $(TORCH_PIN)
	# The real CLIP BPE vocabulary ships inside this wheel; its own dependencies (torchvision) are not needed.
	$(PIP) install -q --no-deps open_clip_torch==3.3.0
	$(PIP) install -q --no-build-isolation -e ".[export,trt,eval,dev]" $(TORCH_PIN)
	touch $(STAMP)

venv install: $(STAMP)

# Rebuild the C++ extension in place (after editing csrc/).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Compile check of the CUDA kernel for sm_80 and sm_90 (nothing runs without a GPU).
cuda-check: $(STAMP)
	$(PY) tools/cuda_check.py

# On a machine with a CUDA GPU, with a CUDA build of torch and the package's dependencies installed (not this
# Makefile's venv, whose torch is the CPU wheel): build the CUDA kernel in place, run the GPU tests (the kernel on every
# layout, the prefix K/V cache on CUDA), time the kernel and the cached encoder. GPU_PY picks the interpreter.
GPU_PY ?= python3
gpu-check:
	@$(GPU_PY) -c "import sys, importlib.util as u; t = u.find_spec('torch') and __import__('torch'); \
	sys.exit(0 if t and t.cuda.is_available() else 'gpu-check: $(GPU_PY) ' + ('sees no CUDA device (torch ' + \
	t.__version__ + ')' if t else 'has no torch') + '; run it on a GPU machine with GPU_PY=<a python whose torch is a CUDA build>')"
	APL_FORCE_CUDA=1 $(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -m pytest -q -m gpu tests/test_prefix_attention.py tests/test_cuda_paths.py
	$(GPU_PY) benchmarks/bench_prefix_attention.py --device cuda

# The suite, plus every docstring example in the package and in experiments/ (examples that need your own model
# folders or a trained prefix are +SKIP; their import lines still run, so a moved name fails here).
test: $(STAMP)
	$(MAKE) --no-print-directory cuda-check
	$(PY) -m pytest -q --doctest-modules tests apl_adapter export experiments

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/apl-demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check apl_adapter export tests benchmarks tools experiments
	$(VENV)/bin/ruff format --check apl_adapter export tests benchmarks tools experiments

# mypy on apl_adapter as configured in pyproject.toml (strict on the tuner, apl_adapter/tuners/apl/).
typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Retrain the synthetic world from scratch into apl_adapter/world/assets: replays the shipped recipe
# (seeded; about 56 min on 2 idle CPU cores). An interrupted run resumes at its last finished base leg.
world: $(STAMP)
	nice $(VENV)/bin/apl-world build --threads 2 --work .world-work

clean:
	rm -rf $(VENV) build *.egg-info apl_adapter/*.so $(DEMO_OUT)
