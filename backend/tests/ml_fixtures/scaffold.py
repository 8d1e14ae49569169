"""Throwaway test trees laid out like the project's tests, with the project's real conftests.

The library's self-tests and the benchmark both run generated suites on the real machinery.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ml_fixtures.declaration import Project


def python_path(project: Project, *extra: Path) -> list[str]:
    """What a child pytest needs on PYTHONPATH to import the application and the tests' modules."""
    return [*map(str, project.python_path), *map(str, extra)]


def lay_out(root: Path, project: Project) -> None:
    """Write ``pytest.ini`` and copy the root and per-tree conftests (the plugin registers the markers).

    The ini's ``pythonpath`` makes the application, the project file and ``ml_fixtures``
    importable in any process that runs the tree: this one, a child pytest, an xdist worker.
    """
    (root / "pytest.ini").write_text(
        f"[pytest]\npythonpath = {' '.join(python_path(project))}\n"
        f"addopts = -p {__package__}.plugin -p no:postgresql --strict-markers -p no:cacheprovider\n"
    )
    shutil.copy(project.tests_dir / "conftest.py", root / "conftest.py")
    for tree in project.trees:
        (root / tree).mkdir(parents=True, exist_ok=True)
        shutil.copy(project.tests_dir / tree / "conftest.py", root / tree / "conftest.py")
