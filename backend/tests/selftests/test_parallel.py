"""Parallel runs: the thread budget of xdist workers, and an ``-n auto`` that counts memory.

The workers themselves (their threads, the footprint they measure and the next ``-n auto`` that
reads it) are checked by the xdist test of ``test_scopes_report_xdist.py``, which starts real ones.
"""

import os
from types import SimpleNamespace

import psutil
import pytest

from ml_fixtures import parallel


class NumberOfWorkers:
    """A plugin for the inner run: what xdist set ``-n`` to."""

    numprocesses = None

    def pytest_configure(self, config):
        self.numprocesses = config.option.numprocesses


@pytest.fixture
def machine(monkeypatch):
    """This machine as ``-n auto`` sees it: 8 CPUs, and ``available`` bytes of free memory."""
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    real = psutil.virtual_memory

    def with_available(available):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=available))

    return with_available


def auto(ml_tree, *args):
    ml_tree.write("unit/test_one.py", "def test_one():\n    pass\n")
    workers = NumberOfWorkers()
    result = ml_tree.pytester.runpytest_inprocess("-n", "auto", "--collect-only", *args, plugins=[workers])
    assert result.ret == 0, result.stdout.str()
    return workers.numprocesses, [line for line in result.outlines if line.startswith("ml-models: -n auto")]


def test_auto_starts_fewer_workers_when_memory_is_short(ml_tree, machine):
    # Before any history, one worker is estimated at 600 MB plus the models' weights (under 200 MB here).
    machine(64 * 2**30)
    workers, lines = auto(ml_tree)
    assert workers == 8
    assert len(lines) == 1 and "→ 8 workers (limited by CPUs: 8; memory would allow" in lines[0]
    assert "(estimated: model weights" in lines[0]

    machine(int(1.7 * 2**30))
    workers, lines = auto(ml_tree)
    assert workers == 2
    assert "→ 2 workers (limited by memory: 1.7 GB available at ~" in lines[0] and "CPUs would allow 8" in lines[0]

    machine(64 * 2**30)
    workers, lines = auto(ml_tree, "--ml-max-memory=1GB")
    assert workers == 1
    assert "→ 1 worker (limited by memory: 1.0 GB allowed by --ml-max-memory=1GB at ~" in lines[0]


def test_a_set_worker_count_and_a_bad_size_are_respected(ml_tree, machine, monkeypatch):
    machine(2**30)
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert auto(ml_tree) == (3, [])
    result = ml_tree.run("--ml-max-memory=lots", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ml-max-memory: cannot read 'lots'; use e.g. 512MB, 2GB or auto*"])


def test_the_thread_budget_shares_the_cpus_and_leaves_the_users_setting_alone():
    assert parallel.ThreadBudget(workers=2, cpus=2).threads == 1
    assert parallel.ThreadBudget(workers=4, cpus=16).threads == 4
    assert parallel.ThreadBudget(workers=3, cpus=2).threads == 1
    kept = parallel.ThreadBudget(workers=2, cpus=8, user_set=(("OMP_NUM_THREADS", "3"),))
    assert kept.threads is None
    assert kept.line() == "ml-models: 2 xdist workers; torch threads left as the environment sets them (OMP_NUM_THREADS=3)"


def test_a_worker_with_torch_imported_already_gets_its_threads_through_torch(monkeypatch):
    """As a worker forked from the warm server: torch is imported before the worker configures."""
    import torch

    for name in parallel.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    cleanups = []
    parallel.apply_threads(SimpleNamespace(add_cleanup=cleanups.append), 1)
    try:
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ
