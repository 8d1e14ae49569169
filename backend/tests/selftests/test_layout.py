"""The library's layout keeps its promises: no import circle in ``ml_fixtures``, a warm core that
imports nothing but the standard library (and itself, relatively), no module over 600 lines."""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

import pytest

import ml_fixtures
from ml_fixtures.affected.sources import parse

PACKAGE = Path(ml_fixtures.__file__).parent
CORE = PACKAGE / "warm" / "core"
CORE_NAME = "_ml_fixtures_warm_core"
#: What the core runs, not what it depends on: the server preloads pytest, a child runs a session.
CORE_PAYLOAD = {("server.py", "pytest"), ("child.py", "pytest")}
MAX_LINES = 600


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """``ml_fixtures.warm.client``, or ``_ml_fixtures_warm_core.server`` for the core (its private name)."""
    if path.is_relative_to(root / "warm" / "core"):
        parts = [CORE_NAME, *path.relative_to(root / "warm" / "core").with_suffix("").parts]
    else:
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """Every module ``path`` imports, at the top or in a function, relative imports resolved (within ``root``)."""
    package = ""
    if path.is_relative_to(root):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def library_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the library's modules it imports (a name imported from a package counts as its module if one exists)."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        targets = {target for target in imports(path, root) if target in files and target != name}
        # ``from ml_fixtures import warm`` names the package, not the package ``ml_fixtures`` itself.
        graph[name] = {t for t in targets if not any(other.startswith(t + ".") and other in targets for other in targets)}
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_the_library_has_no_import_circle():
    graph = library_graph(PACKAGE)
    assert "ml_fixtures.hookspecs" in graph["ml_fixtures.parallel"]  # the graph sees imports inside functions too
    assert cycle_in(graph) is None, f"import circle: {' -> '.join(cycle_in(graph))}"


def test_the_circle_check_finds_a_circle(tmp_path):
    """The check above can fail: two modules that import each other, one of them inside a function."""
    package = tmp_path / "ml_fixtures"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ml_fixtures.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from ml_fixtures import a\n")
    assert sorted(set(cycle_in(library_graph(package)))) == ["ml_fixtures.a", "ml_fixtures.b"]


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda path: path.name)
def test_the_warm_core_imports_the_standard_library_only(path):
    """The server and the launcher run it with nothing of the checkout importable."""
    outside = [
        name
        for name in imports(path)
        if not name.startswith(CORE_NAME)
        and name.partition(".")[0] not in sys.stdlib_module_names
        and (path.name, name) not in CORE_PAYLOAD
    ]
    assert outside == []


def test_nothing_imports_the_core_by_its_package_path():
    """Only by its private name: two copies of it in one process would not know each other's objects."""
    repository = PACKAGE.parents[2]
    offenders = [
        str(path.relative_to(repository))
        for path in sorted(repository.glob("[!.]*/**/*.py"))
        if any(name.startswith("ml_fixtures.warm.core") for name in imports(path))
    ]
    assert offenders == []


def test_no_module_of_the_library_is_over_600_lines():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}
