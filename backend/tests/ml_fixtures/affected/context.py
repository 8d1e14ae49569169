"""What every test of a run depends on: the interpreter, the installed packages, the settings that
change what models answer, and the global files — pytest's configuration, the conftests, this
library, the project's model declaration. A change to any of them affects every test."""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from ml_fixtures.affected.record import FileState
from ml_fixtures.affected.recorder import relative, repository_python_files

LIBRARY = Path(__file__).resolve().parents[1]


def installed_packages() -> list[str]:
    """``name-version`` of every distribution on ``sys.path`` (the names of their ``.dist-info`` directories)."""
    found = set()
    for entry in sys.path:
        directory = Path(entry or ".")
        if directory.name not in ("site-packages", "dist-packages"):
            continue
        try:
            found.update(p.name.removesuffix(".dist-info") for p in directory.iterdir() if p.name.endswith(".dist-info"))
        except OSError:
            continue
    return sorted(found)


def global_files(config: pytest.Config, declared_in: str | None, python_files: list[Path]) -> list[Path]:
    """The files every test depends on: the ini file, every conftest of the repository, the library, the declaration."""
    files = [config.inipath] if config.inipath else []
    files += [path for path in python_files if path.name == "conftest.py"]
    files += sorted(LIBRARY.rglob("*.py"))
    if declared_in:
        files.append(Path(declared_in))
    return list(dict.fromkeys(path.resolve() for path in files))


def conftest_files(config: pytest.Config) -> list[Path]:
    """The conftests this run loaded."""
    return [
        Path(plugin.__file__)
        for plugin in config.pluginmanager.get_plugins()
        if isinstance(plugin, ModuleType) and Path(getattr(plugin, "__file__", None) or "-").name == "conftest.py"
    ]


@dataclass
class Context:
    """The run-wide components, by name: "python", "packages", "settings" and "file:<path>" for each global file."""

    components: dict[str, str]

    @classmethod
    def of(cls, config: pytest.Config, settings: str, declared_in: str | None) -> Context:
        root = config.rootpath
        python_files = repository_python_files(root)
        components = {
            "python": f"{sys.version.split()[0]} ({sys.executable})",
            "packages": json.dumps(installed_packages()),
            "settings": settings,
        }
        for path in global_files(config, declared_in, python_files):
            state = FileState.of(path)
            components[f"file:{relative(path, root) or path}"] = state.digest if state else "(gone)"
        return cls(components)

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.blake2b(json.dumps(self.components, sort_keys=True).encode(), digest_size=12).hexdigest()

    def differences(self, then: dict[str, str]) -> list[str]:
        """What differs from ``then`` (an earlier context's components), in words."""
        found, files = [], []
        for name in sorted(self.components.keys() | then.keys()):
            now, before = self.components.get(name), then.get(name)
            if now == before:
                continue
            if name == "packages":
                found.append(_packages_changed(json.loads(before or "[]"), json.loads(now or "[]")))
            elif name.startswith("file:"):
                path = name.removeprefix("file:")
                files.append(f"{path} {'is new' if before is None else 'is gone' if now in (None, '(gone)') else 'changed'}")
            else:
                found.append(f"{name}: {before} -> {now}")
        if files:  # one line: every test depends on each of them
            others = len(files) - 1
            more = f" (and {others} more file{'s' if others > 1 else ''} every test depends on)" if others else ""
            found.append(files[0] + more)
        return found


def _packages_changed(before: list[str], now: list[str]) -> str:
    gone, new = sorted(set(before) - set(now)), sorted(set(now) - set(before))
    parts = ([f"removed {', '.join(gone[:3])}"] if gone else []) + ([f"installed {', '.join(new[:3])}"] if new else [])
    return "packages changed: " + "; ".join(parts)
