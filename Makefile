# Each target sets up its own virtualenv from the requirements, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test test-slow test-all bench venv seed-scale-model test-durations

venv: $(STAMP)

# uv installs the pinned requirements in seconds where pip takes minutes; /opt/wheels holds the
# CPU build of torch on these machines (pip finds it through its own configuration). pip is the
# fallback wherever uv cannot do the install. $(call install,VENV,REQUIREMENTS-FILE[,UV-OPTIONS])
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
define install
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
	UV_LINK_MODE=copy $(1)/bin/uv pip install --quiet --python $(1)/bin/python $(FIND_LINKS) $(3) -r $(2) \
		|| $(1)/bin/python -m pip install --quiet --disable-pip-version-check -r $(2)
	touch $(1)/.installed
endef

$(STAMP): requirements.txt requirements-dev.txt
	$(call install,$(VENV),requirements-dev.txt)

# The benchmark's own virtualenv: the development requirements and the peers it compares with,
# whose pytest plugins must stay out of $(VENV). Compiled at install: a first import that writes
# __pycache__ into site-packages would change the warm server's package fingerprint mid-benchmark.
$(BENCH_STAMP): requirements.txt requirements-dev.txt requirements-bench.txt
	$(call install,$(BENCH_VENV),requirements-bench.txt,--compile-bytecode)

# Bytecode on: pytest caches its assertion rewrites there, which every child process would redo.
# `make test` is the everyday suite: all but the self-tests marked slow (pytest.ini), which
# `make test-slow` runs; `make test-all` is both in one run (CI's shards). .ci/run runs test and test-slow.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n auto -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest $(PYTEST_ARGS)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

# pytest-split's .test_durations (committed): what each test took, for --splits N --group k in CI.
test-durations: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest --store-durations --clean-durations $(PYTEST_ARGS)

# bge-m3's architecture at full size with random weights (2.2 GB, about 30 s once); prints its directory.
seed-scale-model: $(STAMP)
	PYTHONPATH=backend $(PY) -m app.ml.seed_scale
