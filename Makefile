# Each target sets up its own virtualenv from the requirements, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench venv seed-scale-model

venv: $(STAMP)

# uv installs the pinned requirements in seconds where pip takes minutes; /opt/wheels holds the
# CPU build of torch on these machines (pip finds it through its own configuration). pip is the
# fallback wherever uv cannot do the install.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==0.13.9
	UV_LINK_MODE=copy $(VENV)/bin/uv pip install --quiet --python $(PY) $(FIND_LINKS) -r requirements-dev.txt \
		|| $(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Bytecode on: pytest caches its assertion rewrites there, which every child process would redo.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# bge-m3's architecture at full size with random weights (2.2 GB, about 30 s once); prints its directory.
seed-scale-model: $(STAMP)
	PYTHONPATH=backend $(PY) -m app.ml.seed_scale
