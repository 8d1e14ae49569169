"""A test that changed a shared model fails: the path from the pool's check after its teardown to its call report.

The pool checks its models after each test's teardown — so that a change a fixture undoes
(``monkeypatch``) is no change — and before it evicts one. :class:`ModificationCheck` owns the
path of what it finds: it runs the pool's check after the teardown, receives every change found
(``ModelPool(on_changed=...)``), and fails the test's call report with it before the report is
logged, naming the way out. For that it runs pytest's own protocol with the reports logged after the
teardown, as pytest-rerunfailures does (:meth:`ModificationCheck.run_test`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from _pytest.runner import runtestprotocol  # the protocol's phases without logging, as pytest-rerunfailures uses it

from ml_fixtures.options import ModelScope
from ml_fixtures.pool import ModelKey, ModelPool


class ModificationCheck:
    """The modification check of one run: from the pool's findings to each test's call report."""

    def __init__(self, scope: ModelScope, message: Callable[[ModelKey, list[str]], str]):
        self.scope = scope
        #: ``message(key, changes)``: the failure's text for one changed model.
        self.message = message
        #: What the pool found since the current test started, by model.
        self._found: dict[ModelKey, list[str]] = {}

    def found(self, key: ModelKey, changes: list[str]) -> None:
        """The pool's ``on_changed``: ``key``'s model differs from its snapshot in ``changes``."""
        self._found.setdefault(key, []).extend(changes)

    def after_teardown(self, pool: ModelPool, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """Check the pool after ``item``'s fixtures are undone; release its models as the scope says."""
        module_ends = nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None)
        release = self.scope is ModelScope.FUNCTION or (self.scope is ModelScope.MODULE and module_ends)
        pool.after_test(item.nodeid, module_ends=module_ends, release=release)

    def run_test(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """pytest's run-test protocol, with the call report failed for the changes found during the test."""
        self._found = {}
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        self._fail(reports)
        for report in reports:
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _fail(self, reports: list[pytest.TestReport]) -> None:
        found, self._found = self._found, {}
        report = next((r for r in reports if r.when == "call"), reports[-1])
        for key, changes in found.items():
            message = self.message(key, changes)
            if report.failed:
                report.sections.append(("modified the shared model", message))
                continue
            report.outcome, report.longrepr = "failed", message
            if hasattr(report, "wasxfail"):  # an expected failure does not excuse the change
                del report.wasxfail
