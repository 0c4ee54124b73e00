# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: env demo test test-oldest bench clean

env: $(STAMP)

# torch goes in first, on its own, only where none is importable: this keeps pip
# from pulling a multi-GB CUDA build onto a CPU machine to satisfy torch>=2.11.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The same suite on the oldest torch and triton the package supports (those of the GPU
# machine the benchmarks ran on), in a venv of its own. PyPI's torch 2.11 is a CUDA
# build of several GB; set OLDEST_TORCH to a CPU build's spec where one is at hand.
OLDEST       := .venv-oldest
OLDEST_TORCH ?= torch==2.11.0

test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q "$(OLDEST_TORCH)" "triton==3.6.0"
	$(OLDEST)/bin/python -m pip install -q -e ".[test,bench]"
	$(OLDEST)/bin/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) $(OLDEST) demo_out
