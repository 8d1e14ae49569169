"""Which recorded dependencies changed: since each test last ran (the record's digests), and, for
``--ml-affected=REF``, since a git revision too.

:class:`Now` looks at the repository as it is, each thing once and only when asked: a source whose
size and modification time are those the record saw is not read again. :func:`reasons` says, for one
test's dependencies, what changed, in the words of the run's summary.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ml_fixtures.affected.context import Context
from ml_fixtures.affected.record import Dependencies, FileState, SourceState
from ml_fixtures.affected.sources import MODULE, Source


class Now:
    """The repository now: digests of its sources' blocks and of its files, the models' fingerprints,
    the cassettes' answers."""

    def __init__(
        self,
        root: Path,
        sources: dict[str, SourceState],
        files: dict[str, FileState],
        fingerprint: Callable[[str], str | None],
        answer: Callable[[str, str], str],
    ):
        self.root = root
        self._known_sources, self._known_files = sources, files
        self._fingerprint, self._answer = fingerprint, answer
        #: What was looked at, for the record's caches.
        self.sources: dict[str, SourceState | None] = {}
        self.files: dict[str, FileState | None] = {}
        self._models: dict[str, str] = {}
        self._answers: dict[tuple[str, str], str] = {}

    def blocks(self, path: str) -> dict[str, str] | None:
        """Block -> digest of the source at ``path`` (relative), or None where it is gone or not Python."""
        if path not in self.sources:
            self.sources[path] = self._source(path)
        state = self.sources[path]
        return None if state is None else state.blocks

    def _source(self, path: str) -> SourceState | None:
        try:
            info = (self.root / path).stat()
        except OSError:
            return None
        known = self._known_sources.get(path)
        if known is not None and (known.mtime_ns, known.size) == (info.st_mtime_ns, info.st_size):
            return known
        source = Source.read(self.root / path, self.root)
        return None if source is None else SourceState(info.st_mtime_ns, info.st_size, source.blocks)

    def file(self, path: str) -> str:
        if path not in self.files:
            known = self._known_files.get(path)
            try:
                info = (self.root / path).stat()
            except OSError:
                self.files[path] = None
            else:
                same = known is not None and (known.mtime_ns, known.size) == (info.st_mtime_ns, info.st_size)
                self.files[path] = known if same else FileState.of(self.root / path)
        state = self.files[path]
        return "" if state is None else state.digest

    def model(self, name: str) -> str:
        if name not in self._models:
            self._models[name] = self._fingerprint(name) or ""
        return self._models[name]

    def answer(self, model: str, key: str) -> str:
        if (model, key) not in self._answers:
            self._answers[(model, key)] = self._answer(model, key)
        return self._answers[(model, key)]


@dataclass
class SinceRevision:
    """What git says changed since a revision: per Python file, the blocks whose digest differs (None:
    the file is new, gone, or not Python); the other files; the cassette answers that differ."""

    revision: str
    blocks: dict[str, set[str] | None] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)
    answers: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def of(cls, root: Path, revision: str, cassette_dir: Path) -> SinceRevision:
        """``git diff`` against ``revision`` (the working tree, staged or not, and untracked files)."""
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip())
        changed = _git(root, "diff", "--name-only", "-z", revision, "--", ".").split("\0")
        changed += _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--full-name", ".").split("\0")
        found = cls(revision)
        for name in filter(None, changed):
            path = top / name
            try:
                relative = path.relative_to(root).as_posix()
            except ValueError:
                continue
            old = _git(root, "show", f"{revision}:{name}", check=False)
            if path.suffix == ".py":
                found.blocks[relative] = _changed_blocks(old, path, root)
            elif path.is_relative_to(cassette_dir) and path.suffix == ".json":
                found.answers |= _changed_answers(old, path)
            else:
                found.files.add(relative)
        return found


def _git(root: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ValueError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout if done.returncode == 0 else ""


def _changed_blocks(old_text: str, path: Path, root: Path) -> set[str] | None:
    try:
        old = Source.parse(old_text) if old_text else None
    except SyntaxError:
        old = None
    new = Source.read(path, root) if path.exists() else None
    if old is None or new is None:
        return None
    return {name for name in old.blocks.keys() | new.blocks.keys() if old.blocks.get(name) != new.blocks.get(name)}


def _changed_answers(old_text: str, path: Path) -> set[tuple[str, str]]:
    def calls(text: str) -> dict[tuple[str, str], object]:
        try:
            models = json.loads(text).get("models", {}) if text else {}
        except ValueError:
            return {}
        return {(model, key): value for model, entry in models.items() for key, value in entry.get("calls", {}).items()}

    old, new = calls(old_text), calls(path.read_text(encoding="utf-8") if path.exists() else "")
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


@dataclass(frozen=True)
class Reason:
    """One thing that changed among a test's dependencies, as the summary says it."""

    line: str
    #: For cassette answers: the (model, key) entries that changed.
    entries: frozenset[tuple[str, str]] = frozenset()


def reasons(
    dependencies: Dependencies,
    now: Now,
    context: Context,
    contexts: dict[str, dict[str, str]],
    revision: SinceRevision | None = None,
) -> list[Reason]:
    """What changed among one test's dependencies (empty: nothing)."""
    found = []
    if dependencies.context != context.digest:
        found += context.differences(contexts[dependencies.context]) if dependencies.context in contexts else []
        found += [] if found else ["the run-wide settings changed"]
    by_file: dict[str, list[str]] = {}
    for path, block, digest in dependencies.blocks:
        blocks = now.blocks(path)
        if blocks is None or blocks.get(block) != digest or _since(revision, path, block):
            by_file.setdefault(path, []).append(block)
    for path, digest in dependencies.modules:
        blocks = now.blocks(path)
        if blocks is None or blocks.get(MODULE) != digest or _since(revision, path, MODULE):
            by_file.setdefault(path, []).append("module level" if blocks is not None else "gone")
    found += [f"{path} changed ({', '.join(sorted(set(names)))})" for path, names in sorted(by_file.items())]
    found += [
        f"{path} changed"
        for path, digest in sorted(dependencies.data)
        if now.file(path) != digest or (revision is not None and path in revision.files)
    ]
    found += [f"model {model} changed" for model, fingerprint in sorted(dependencies.models) if now.model(model) != fingerprint]
    entries = {
        (model, key)
        for model, key, digest in dependencies.lookups
        if now.answer(model, key) != digest or (revision is not None and (model, key) in revision.answers)
    }
    lines = [Reason(line) for line in found]
    for model in sorted({model for model, _ in entries}):
        lines.append(Reason(f"cassette entries of {model} changed", frozenset(e for e in entries if e[0] == model)))
    return lines


def _since(revision: SinceRevision | None, path: str, block: str) -> bool:
    if revision is None or path not in revision.blocks:
        return False
    changed = revision.blocks[path]
    return changed is None or block in changed
