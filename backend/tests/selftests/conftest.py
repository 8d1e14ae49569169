"""Self-tests of the ML fixture library: pytester runs of small trees built on the real conftests."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
BACKEND = TESTS.parent
REPO = BACKEND.parent


class MLTree:
    """A throwaway test tree with the repository's real conftests, run in a fresh process."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
        self.pytester, self.monkeypatch = pytester, monkeypatch
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(BACKEND), str(TESTS), str(pytester.path)]))
        self.root = pytester.path
        markers = configparser.ConfigParser()
        markers.read(REPO / "pytest.ini")
        self.root.joinpath("pytest.ini").write_text(
            "[pytest]\naddopts = --strict-markers -p no:cacheprovider\n"
            "markers =" + markers["pytest"]["markers"].replace("\n", "\n    ") + "\n"
        )
        shutil.copy(TESTS / "conftest.py", self.root / "conftest.py")
        for tree in ("unit", "services", "integration"):
            (self.root / tree).mkdir()
            shutil.copy(TESTS / tree / "conftest.py", self.root / tree / "conftest.py")

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
