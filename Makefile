# Two commands on a fresh machine:
#   make demo   train a CartPole policy (GPU when present, else the Triton interpreter)
#   make test   install the package with its test extras and run the whole suite
# Both create and reuse a virtualenv in .venv. On a machine without a GPU, torch is pinned to
# a CPU build; set TORCH_SPEC to install another (e.g. TORCH_SPEC="torch==2.11.0").

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[test,notebooks]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	PYTHONUNBUFFERED=1 $(PY) -m evotorch_eggroll.demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
