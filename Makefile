# Each target sets up its own virtualenv from the requirements, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench venv seed-scale-model

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Bytecode on: pytest caches its assertion rewrites there, which every child process would redo.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# bge-m3's architecture at full size with random weights (2.2 GB, about 30 s once); prints its directory.
seed-scale-model: $(STAMP)
	PYTHONPATH=backend $(PY) -m app.ml.seed_scale
