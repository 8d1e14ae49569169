"""Throwaway test trees laid out like backend/tests, with the repository's real conftests.

The library's self-tests and the benchmark both run generated suites on the real machinery.
"""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BACKEND = TESTS.parent
REPO = BACKEND.parent
TREES = ("unit", "services", "integration")


def python_path(*extra: Path) -> list[str]:
    """What a child pytest needs on PYTHONPATH to import ``app`` and ``ml_fixtures``."""
    return [str(BACKEND), str(TESTS), *map(str, extra)]


def lay_out(root: Path) -> None:
    """Write ``pytest.ini`` (the repository's markers) and copy the root and per-tree conftests."""
    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    markers = ini["pytest"]["markers"].replace("\n", "\n    ")
    (root / "pytest.ini").write_text(
        f"[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers ={markers}\n"
    )
    shutil.copy(TESTS / "conftest.py", root / "conftest.py")
    for tree in TREES:
        (root / tree).mkdir(parents=True, exist_ok=True)
        shutil.copy(TESTS / tree / "conftest.py", root / tree / "conftest.py")
