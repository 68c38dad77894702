# Two commands on a fresh machine:
#   make demo   install the package and train a CartPole policy (GPU when present, else
#               the plain-torch CPU path)
#   make test   install the package with its test extras and run the whole suite
# Both create and reuse a virtualenv in .venv, with a torch/Triton pair that is tested
# together: on a machine with an NVIDIA GPU the CUDA build of torch 2.11 and the Triton it
# requires (3.6); without one, torch's CPU build 2.13 and the oldest supported Triton (3.6).
# TORCH_SPEC/TRITON_SPEC select another pair (a CUDA build of torch accepts only the Triton
# release it was built with), e.g. make test TRITON_SPEC=triton==3.9.0; a venv whose pair
# differs from the one asked for is reinstalled.
#   make test-newest   a shorter pass (kernels, native API, EvoTorch) in .venv-newest with
#                      the newest torch CPU build and the newest Triton (test extras only)
# Without a GPU the tests run in one process per core (PYTEST_WORKERS=auto, pytest-xdist);
# PYTEST_WORKERS=0 runs them in one process.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAVE_GPU),1)
TORCH_SPEC ?= torch==2.11.0
else
TORCH_SPEC ?= torch==2.13.0
endif
TRITON_SPEC ?= triton==3.6.0
PYTEST_ARGS ?=
# Test processes (pytest-xdist): without a GPU the interpreter-bound suite runs on every
# core; with one, in a single process (the GPU tier's tests share one device).
ifeq ($(HAVE_GPU),1)
PYTEST_WORKERS ?= 0
else
PYTEST_WORKERS ?= auto
endif
# MuJoCo (HalfCheetah tests) and CPU JAX (the JAX environment adapter's tests); Brax is left
# out: it brings ~35 packages and its physics takes tens of seconds to compile on the CPU.
EXTRAS ?= test,notebooks,mujoco,jax

NEWEST_VENV ?= .venv-newest
NEWEST_TORCH_SPEC ?= torch==2.13.0
NEWEST_TRITON_SPEC ?= triton==3.9.0
NEWEST_TESTS ?= tests/torch_tests/test_low_rank_perturbations.py \
	tests/torch_tests/test_deterministic_noise.py \
	tests/torch_tests/test_forward_equivalence.py \
	tests/torch_tests/test_parameter_updates.py \
	tests/torch_tests/test_strategy_api.py \
	tests/evotorch_tests/test_algorithms.py \
	tests/evotorch_tests/test_packaging.py

.PHONY: demo test test-newest install clean

SPECS := $(TORCH_SPEC) $(TRITON_SPEC)
# .venv/.base: the torch/Triton pair and the package (what the demo needs); .venv/.installed:
# also the extras the tests use. Each stamp records what it installed; a different request
# reinstalls.
ifneq ($(shell cat $(VENV)/.base 2>/dev/null),$(SPECS))
.PHONY: $(VENV)/.base
endif
ifneq ($(shell cat $(VENV)/.installed 2>/dev/null),$(SPECS) [$(EXTRAS)])
.PHONY: $(VENV)/.installed
endif

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e . "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
	echo "$(SPECS)" > $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	echo "$(SPECS) [$(EXTRAS)]" > $@

install: $(VENV)/.installed

demo: $(VENV)/.base
	PYTHONUNBUFFERED=1 $(PY) -m evotorch_eggroll.demo

test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-newest:
	$(MAKE) test VENV=$(NEWEST_VENV) TORCH_SPEC=$(NEWEST_TORCH_SPEC) \
		TRITON_SPEC=$(NEWEST_TRITON_SPEC) EXTRAS=test PYTEST_ARGS="$(NEWEST_TESTS) $(PYTEST_ARGS)"

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build dist *.egg-info .pytest_cache
