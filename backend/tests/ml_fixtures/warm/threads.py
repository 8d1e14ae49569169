"""A warm child's torch threads, shared with the server's other runs: run in a warm child's pytest
(a warm run, or an xdist worker forked from the server).

Before each test that uses real models, the child counts itself among the runs that run models on
the server's board (``core/cores.py``) and takes ``CPUs // those runs`` torch threads: alone it
keeps every core (an xdist worker: its budget, ``parallel.py``, which is the ceiling); when other runs
start or end, it follows between tests. A budget the user set —
``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment, or ``torch.set_num_threads`` in a
conftest or a test — is the user's: the child then leaves the threads alone and says so.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from _ml_fixtures_warm_core import cores

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Change:
    """The threads a run took at one test, and why."""

    test: str | None
    threads: int
    runs: int


class SharedThreads:
    """Registered in a warm child's session as ``ml-warm-threads``."""

    def __init__(self, uses_real_models: Callable[[pytest.Item], bool], ceiling: int | None = None):
        """Made before the session applies an xdist worker's budget (``ceiling``): what is set now is the user's."""
        self.uses_real_models = uses_real_models
        self.cpus = cores.usable_cpus()
        self.ceiling = ceiling or self.cpus
        self.user_set = ", ".join(f"{name}={os.environ[name]}" for name in THREAD_VARIABLES if name in os.environ)
        torch = sys.modules.get("torch")
        if not self.user_set and torch is not None and torch.get_num_threads() != self.cpus:
            # torch starts with a thread per usable CPU: a conftest imported before the session set it.
            self.user_set = f"torch.set_num_threads({torch.get_num_threads()}) before the session"
        #: What torch's threads are unless someone else set them: ours, or an xdist worker's budget.
        self.expected = ceiling or self.cpus
        self.changes: list[Change] = []
        self.left_to_user: str | None = None
        self.running_models = False

    @staticmethod
    def applies() -> bool:
        """In a child forked from the warm server (which has a slot on its board)."""
        return cores.BOARD is not None and cores.SLOT is not None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Before the test's fixtures (a cached model's load included): take this run's share now."""
        if self.user_set or self.left_to_user:
            return
        self.running_models = self.running_models or self.uses_real_models(item)
        if self.running_models:
            self._take_share(item.nodeid)

    def _take_share(self, test: str) -> None:
        torch = sys.modules.get("torch")
        if torch is None:
            return
        current = torch.get_num_threads()
        if current != self.expected:
            self.left_to_user = f"torch.set_num_threads({current}) at {test} or before it"
            return
        threads = cores.share(self.cpus, self.ceiling)
        if threads != current or not self.changes:
            torch.set_num_threads(threads)
            self.changes.append(Change(test, threads, cores.runs_with_models()))
        self.expected = threads

    def pytest_report_header(self) -> str:
        if self.user_set:
            return f"ml-models: warm run; torch threads left as the user set them ({self.user_set})"
        return (
            f"ml-models: warm run; torch threads shared with the warm server's other runs that use models "
            f"({self.cpus} CPUs), from the first test that uses one"
        )

    def lines(self) -> list[str]:
        """How this run's torch threads went, for the load report."""
        if self.user_set:
            return []  # the header said so
        left = f"torch threads left as the user set them ({self.left_to_user})" if self.left_to_user else None
        if not self.changes:
            return [left] if left else []
        steps = " → ".join(
            f"{change.threads} ({change.runs} run{'s' if change.runs != 1 else ''} with models, at {change.test})"
            for change in self.changes
        )
        line = f"torch threads (shared with the warm server's other runs, {self.cpus} CPUs): {steps}"
        return [line + (f"; then {left}" if left else "")]
