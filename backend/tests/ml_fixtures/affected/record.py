"""The dependency record: what each test depended on when it last ran, in one SQLite file in
pytest's cache directory (``.pytest_cache/d/ml-affected/dependencies.sqlite``).

Tests with the same dependencies share one row of ``depsets`` (parametrized tests mostly do), so a
suite of thousands of tests stays small; a run that changed nothing reads the states of the files
(``sources``, ``files``) and the tests' outcomes, not their dependencies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (path TEXT PRIMARY KEY, mtime_ns INTEGER, size INTEGER, blocks TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, mtime_ns INTEGER, size INTEGER, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS depsets (id INTEGER PRIMARY KEY, digest TEXT UNIQUE NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (digest TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tests (nodeid TEXT PRIMARY KEY, outcome TEXT NOT NULL, depset INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Dependencies:
    """What one test depended on, each with its digest then. Paths are relative to the rootdir, with ``/``."""

    #: The run-wide state it ran under (``contexts``: the environment, the settings, the global files).
    context: str = ""
    #: (path, block, digest) of the Python code it ran: in its set-up, call and teardown, and in the
    #: set-up of every fixture it used, wherever that ran (a module-scoped fixture runs for the first test).
    blocks: frozenset[tuple[str, str, str]] = frozenset()
    #: (path, module block's digest) of the repository's Python files its module imports, directly or not, itself included.
    modules: frozenset[tuple[str, str]] = frozenset()
    #: (path, digest of the content) of the data files under the repository it opened for reading; a
    #: test that started other processes (whose code is not seen) gets every Python file of the repository here.
    data: frozenset[tuple[str, str]] = frozenset()
    #: (model, fingerprint then, or "" where it was not on disk) of the real models it used.
    models: frozenset[tuple[str, str]] = frozenset()
    #: (model, cassette key, digest of the answer or "" for none) of what its fake models asked the cassettes.
    lookups: frozenset[tuple[str, str, str]] = frozenset()

    def to_json(self) -> str:
        fields = ("blocks", "modules", "data", "models", "lookups")
        body = {"context": self.context, **{name: sorted(getattr(self, name)) for name in fields}}
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Dependencies:
        body = json.loads(text)
        return cls(
            body["context"], *(frozenset(map(tuple, body[name])) for name in ("blocks", "modules", "data", "models", "lookups"))
        )


@dataclass(frozen=True)
class TestRecord:
    __test__ = False  # not a test class, for pytest's collection

    nodeid: str
    #: "passed", "failed", "skipped" (a test whose set-up or teardown failed: "failed").
    outcome: str
    dependencies: Dependencies


@dataclass(frozen=True)
class SourceState:
    mtime_ns: int
    size: int
    #: Block name -> digest (``sources.Source.blocks``).
    blocks: dict[str, str]


@dataclass(frozen=True)
class FileState:
    mtime_ns: int
    size: int
    digest: str

    @classmethod
    def of(cls, path: Path) -> FileState | None:
        try:
            info = path.stat()
            digest = hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()
        except OSError:
            return None
        return cls(info.st_mtime_ns, info.st_size, digest)


@dataclass
class Snapshot:
    """Everything one run adds to the record: its tests, the states of the files they depended on,
    and the run-wide facts (``meta``: the environment, the global files, the models' fingerprints)."""

    tests: list[TestRecord] = field(default_factory=list)
    sources: dict[str, SourceState] = field(default_factory=dict)
    files: dict[str, FileState] = field(default_factory=dict)
    #: Context digest -> its components (name -> value), which say what differs when one changed.
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    #: Tests gone from the suite: their rows go.
    deleted: list[str] = field(default_factory=list)
    #: The outcomes of tests that ran untraced (their dependencies as recorded before).
    outcomes: dict[str, str] = field(default_factory=dict)


class DependencyRecord:
    """The SQLite file; each method opens it for one transaction (concurrent runs queue on its lock)."""

    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            with connection:
                connection.executescript(SCHEMA)
                yield connection
        finally:
            connection.close()

    def exists(self) -> bool:
        return self.path.is_file()

    def meta(self) -> dict[str, str]:
        with self._connect() as db:
            return dict(db.execute("SELECT key, value FROM meta"))

    def outcomes(self) -> dict[str, tuple[str, int]]:
        """nodeid -> (outcome, depset id) of every recorded test."""
        with self._connect() as db:
            return {
                nodeid: (outcome, depset) for nodeid, outcome, depset in db.execute("SELECT nodeid, outcome, depset FROM tests")
            }

    def sources(self) -> dict[str, SourceState]:
        with self._connect() as db:
            rows = db.execute("SELECT path, mtime_ns, size, blocks FROM sources")
            return {path: SourceState(mtime, size, json.loads(blocks)) for path, mtime, size, blocks in rows}

    def files(self) -> dict[str, FileState]:
        with self._connect() as db:
            return {path: FileState(mtime, size, digest) for path, mtime, size, digest in db.execute("SELECT * FROM files")}

    def depsets(self, ids: Iterable[int] | None = None) -> dict[int, Dependencies]:
        with self._connect() as db:
            rows = db.execute("SELECT id, body FROM depsets")
            wanted = None if ids is None else set(ids)
            return {i: Dependencies.from_json(body) for i, body in rows if wanted is None or i in wanted}

    def contexts(self) -> dict[str, dict[str, str]]:
        with self._connect() as db:
            return {digest: json.loads(body) for digest, body in db.execute("SELECT digest, body FROM contexts")}

    def write(self, snapshot: Snapshot) -> None:
        """Add one run: its tests (replacing their rows), the file states, the meta."""
        with self._connect() as db:
            ids: dict[str, int] = {}
            for record in snapshot.tests:
                body = record.dependencies.to_json()
                digest = hashlib.blake2b(body.encode(), digest_size=16).hexdigest()
                if digest not in ids:
                    db.execute("INSERT OR IGNORE INTO depsets (digest, body) VALUES (?, ?)", (digest, body))
                    ids[digest] = db.execute("SELECT id FROM depsets WHERE digest = ?", (digest,)).fetchone()[0]
                db.execute("INSERT OR REPLACE INTO tests VALUES (?, ?, ?)", (record.nodeid, record.outcome, ids[digest]))
            db.executemany("UPDATE tests SET outcome = ? WHERE nodeid = ?", [(o, n) for n, o in snapshot.outcomes.items()])
            db.executemany("DELETE FROM tests WHERE nodeid = ?", [(nodeid,) for nodeid in snapshot.deleted])
            db.execute("DELETE FROM depsets WHERE id NOT IN (SELECT DISTINCT depset FROM tests)")
            db.executemany(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?)",
                [(p, s.mtime_ns, s.size, json.dumps(s.blocks, sort_keys=True)) for p, s in snapshot.sources.items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                [(p, f.mtime_ns, f.size, f.digest) for p, f in snapshot.files.items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO contexts VALUES (?, ?)",
                [(digest, json.dumps(body, sort_keys=True)) for digest, body in snapshot.contexts.items()],
            )
            db.execute("DELETE FROM contexts WHERE digest NOT IN (SELECT json_extract(body, '$.context') FROM depsets)")
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("schema", SCHEMA_VERSION), *snapshot.meta.items()])
