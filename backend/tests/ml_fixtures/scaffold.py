"""Throwaway test trees laid out like backend/tests, with the repository's real conftests.

The library's self-tests and the benchmark both run generated suites on the real machinery.
"""

from __future__ import annotations

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
    """Write ``pytest.ini`` and copy the root and per-tree conftests (the plugin registers the markers).

    The ini's ``pythonpath`` finds ``app`` and ``ml_fixtures`` in any process that runs the tree:
    this one, a child pytest, an xdist worker.
    """
    (root / "pytest.ini").write_text(
        f"[pytest]\npythonpath = {' '.join(python_path())}\naddopts = -p ml_fixtures.plugin --strict-markers -p no:cacheprovider\n"
    )
    shutil.copy(TESTS / "conftest.py", root / "conftest.py")
    for tree in TREES:
        (root / tree).mkdir(parents=True, exist_ok=True)
        shutil.copy(TESTS / tree / "conftest.py", root / tree / "conftest.py")
