# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is installed from its pin first: a bare `torch` requirement would make
# pip fetch a multi-GB CUDA build. Override TORCH_SPEC to pick another build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.grulab-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml setup.py $(wildcard src/grulab/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "setuptools>=68" wheel ninja
	@echo "grulab: installing, and compiling the native GRU kernel for every x86-64 CPU (about a minute) ..."
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	$(VENV)/bin/grulab kernels
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/grulab demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_gru.py
	$(PY) benchmarks/bench_grid.py

clean:
	rm -rf $(VENV) build src/*.egg-info src/grulab/_native*.so
