"""Self-tests of the ML fixture library: pytester runs of small trees built on the real conftests."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from ml_fixtures import scaffold

TESTS, REPO = scaffold.TESTS, scaffold.REPO


class MLTree:
    """A throwaway test tree with the repository's real conftests, run in a fresh process."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
        self.pytester, self.monkeypatch = pytester, monkeypatch
        self.root = pytester.path
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(scaffold.python_path(self.root)))
        scaffold.lay_out(self.root)

    def write(self, relpath: str, source: str) -> Path:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    def run(self, *args: str, **env: str) -> pytest.RunResult:
        """Run pytest on the tree in a fresh process (``env`` is added to its environment)."""
        for key, value in env.items():
            self.monkeypatch.setenv(key, value)
        self.report = self.root / "ml-report.json"
        return self.pytester.runpytest_subprocess(f"--ml-model-report={self.report}", *args, timeout=300)

    def loads(self) -> dict:
        return json.loads(self.report.read_text())


@pytest.fixture
def ml_tree(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> MLTree:
    """A pytester tree laid out like backend/tests, with the real conftests copied in."""
    return MLTree(pytester, monkeypatch)
