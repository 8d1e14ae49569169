"""Recording what each test depends on: run in every process that runs tests (a plain run, an xdist
worker, a warm child), on every run that has pytest's cache.

- The Python code it ran, by block (``sources.py``): coverage.py's C tracer, with a dynamic context
  per test and per shared fixture's set-up, measuring the repository's files only (the library and
  the conftests, which every test depends on, aside). On Python 3.11 any trace function slows all
  Python code about twice, so only the test modules with a test whose record is stale (missing, or
  a dependency changed) are traced; the others keep their records, and only their outcome is noted.
  Libraries imported while a test is traced (torch, transformers: seconds of module code) are
  imported with the tracer paused (:class:`_UntracedLibraries`): their code is not the repository's.
- The repository's data files it opened, and whether it started other processes: an audit hook
  (``open``, ``subprocess.Popen``, ``os.fork``, ``os.exec``, ``os.posix_spawn``).
- The real models it used and what its fake models asked the cassettes: the plugin tells
  (:meth:`DependencyRecorder.used_model`, :meth:`DependencyRecorder.looked_up`).

In a pytester session inside another run, the outer run's recorder already traces (coverage has one
collector per thread): the inner session records nothing, and what it runs counts for the outer test.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ml_fixtures.affected.record import Dependencies, FileState, SourceState, TestRecord
from ml_fixtures.affected.sources import MODULE, Source, import_closure
from ml_fixtures.import_hooks import WrappingFinder

#: Directories under the rootdir that are not the repository's code or data.
IGNORED_DIRECTORIES = {
    ".git",
    ".venv",
    ".venv-bench",
    "__pycache__",
    ".pytest_cache",
    "node_modules",
    ".tox",
    ".mypy_cache",
    ".ruff_cache",
}
SPAWN_EVENTS = {"subprocess.Popen", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system"}


def repository_python_files(root: Path) -> list[Path]:
    """Every Python file under ``root`` but in the ignored directories (virtualenvs, caches, git)."""
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in IGNORED_DIRECTORIES and not d.startswith(".venv"))
        found += [Path(directory) / name for name in sorted(names) if name.endswith(".py")]
    return found


@functools.cache
def relative(path: str | Path, root: Path) -> str | None:
    """``path`` relative to ``root`` with ``/``, or None outside it or in an ignored directory."""
    absolute, top = os.path.abspath(path), str(root)
    if not absolute.startswith(top + os.sep):
        return None
    parts = absolute[len(top) + 1 :].split(os.sep)
    if IGNORED_DIRECTORIES.intersection(parts[:-1]) or parts[0].startswith(".venv"):
        return None
    return "/".join(parts)


class _Audit:
    """The one audit hook of this process (they cannot be removed): it reports to the recorder in charge."""

    recorder: DependencyRecorder | None = None
    #: Sets that collect every path opened while they are here (:func:`capture_opened`).
    captures: list[set[str]] = []
    installed = False

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            sys.addaudithook(cls.hook)
            cls.installed = True

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.captures and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            for capture in cls.captures:
                capture.add(os.path.abspath(os.fsdecode(args[0])))
        recorder = cls.recorder
        if recorder is None:
            return
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & 3
            )
            if isinstance(path, (str, bytes, os.PathLike)) and not writing and not isinstance(path, int):
                recorder.opened(os.fsdecode(path))
        elif event in SPAWN_EVENTS and recorder.current is not None:
            recorder.spawned.add(recorder.current)


@contextlib.contextmanager
def capture_opened() -> Iterator[set[str]]:
    """The absolute paths of the files opened in this process while the ``with`` block runs."""
    _Audit.install()
    opened: set[str] = set()
    _Audit.captures.append(opened)
    try:
        yield opened
    finally:
        _Audit.captures.remove(opened)


class _UntracedLibraries(WrappingFinder):
    """While the tracer runs, a module from outside the repository executes with it paused: nothing
    it runs is measured anyway, and importing torch traced takes seconds more."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def find_spec(self, fullname, path, target=None):
        if sys.gettrace() is None:
            return None
        spec = self.spec_from_the_others(fullname, path, target)
        if spec is None or spec.loader is None or not spec.has_location or relative(spec.origin, self.root) is not None:
            return None  # the repository's own modules (and namespace packages) import traced
        spec.loader = _UntracedLoader(spec.loader)
        return spec


class _UntracedLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):
        # What else the module's __loader__ is asked for later (get_source for tracebacks, resource readers).
        return getattr(self.loader, name)

    def create_module(self, spec):
        with _tracer_paused():
            return self.loader.create_module(spec)

    def exec_module(self, module):
        with _tracer_paused():
            self.loader.exec_module(module)


@contextlib.contextmanager
def _tracer_paused() -> Iterator[None]:
    # coverage's CTracer, given back through sys.settrace, reinstalls itself as the C-level tracer.
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        yield
    finally:
        sys.settrace(tracer)


class DependencyRecorder:
    """The dependencies of the tests this process runs (registered as ``ml-affected-recorder``)."""

    #: The recorders of this process, outermost first: a pytester session inside a run records nothing.
    active: list[DependencyRecorder] = []

    def __init__(self, root: Path, cassettes: str):
        self.root = root
        #: The cassettes' directory (relative): they are answers (lookups), not data files.
        self.cassettes = cassettes
        #: The test files whose tests are traced (None: all); set after the collection.
        self.traced_files: set[str] | None = None
        #: Files every test depends on anyway (the library, the conftests): not traced, for speed.
        self.excluded: list[Path] = []
        #: ``sys.path``'s entries under the repository: where its modules are found.
        self.search: list[Path] = []
        self.coverage = None
        self.tracing = False
        #: Another coverage measurement got in the way: nothing traced this run is recorded.
        self.unreliable = False
        #: The test being traced (nodeid), or None between tests and in tests whose record stands.
        self.current: str | None = None
        self.opened_files: dict[str, set[str]] = defaultdict(set)
        #: Repository module -> the data files its code opened in this process.
        self.opened_by_module: dict[str, set[str]] = defaultdict(set)
        self.spawned: set[str] = set()
        self.models: dict[str, set[str]] = defaultdict(set)
        self.lookups: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
        #: nodeid -> the contexts of the fixture set-ups it used; the test's own context is its nodeid.
        self.fixture_contexts: dict[str, set[str]] = defaultdict(set)
        self.test_files: dict[str, str] = {}
        self.outcomes: dict[str, str] = {}
        self._parsed: dict[str, Source | None] = {}
        self._libraries = _UntracedLibraries(root)

    # ------------------------------------------------------------ tracing

    @classmethod
    def nested(cls) -> bool:
        """Whether another run in this process records already (or coverage measures it): its tracer sees this one."""
        if cls.active:
            return True
        coverage = sys.modules.get("coverage")
        return coverage is not None and coverage.Coverage.current() is not None

    def prepare(self, excluded: list[Path], search: list[Path], traced_files: set[str] | None) -> None:
        """After the collection: what not to trace, where modules are found, which test files to trace."""
        self.excluded, self.search, self.traced_files = excluded, search, traced_files

    def begin(self) -> None:
        DependencyRecorder.active.append(self)
        _Audit.install()
        _Audit.recorder = self

    def end(self) -> None:
        """Stop tracing and listening (again: nothing)."""
        if self.coverage is not None and self.tracing:
            self._trace(False)
        if _Audit.recorder is self:
            _Audit.recorder = None
        if self._libraries in sys.meta_path:
            sys.meta_path.remove(self._libraries)
        if self in DependencyRecorder.active:
            DependencyRecorder.active.remove(self)

    def _trace(self, on: bool) -> None:
        """Tracing on for a test file whose records are stale, off for the others (started once, on first need)."""
        if on and self.coverage is None:
            import coverage

            omit = [f"{path}/*" if path.is_dir() else str(path) for path in self.excluded]
            self.coverage = coverage.Coverage(data_file=None, config_file=False, source=[str(self.root)], omit=omit)
            sys.meta_path.insert(0, self._libraries)
        if on and not self.tracing and not self.unreliable:
            self.coverage.start()
        elif not on and self.tracing:
            if self.coverage.current() is not self.coverage:
                # Another measurement started on top of this one (a plugin that starts coverage lazily):
                # neither can stop now without breaking the other; this run's traces are not to be trusted.
                self.unreliable = True
                return
            self.coverage.switch_context("")
            self.coverage.stop()
        self.tracing = on and not self.unreliable

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        """The test's context from its set-up to its teardown (switched once a test: each switch flushes)."""
        traced = self.traced_files is None or str(item.path) in self.traced_files
        self._trace(traced)
        if traced:
            self.current = item.nodeid
            self.test_files[item.nodeid] = str(item.path)
            self.coverage.switch_context(item.nodeid)
        try:
            return (yield)
        finally:
            self.current = None

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
        """A shared fixture's set-up in a context of its own: every test that uses it depends on it (a
        function-scoped one sets up in its test's context)."""
        if fixturedef.scope == "function" or not self.tracing:
            return (yield)
        previous = self.coverage.switch_context(_fixture_context(fixturedef, request))
        try:
            return (yield)
        finally:
            self.coverage.switch_context(previous or "")

    def pytest_runtest_call(self, item: pytest.Item) -> None:
        """After the set-up: the shared fixtures this test uses, by the context of their set-up."""
        if self.current is None:
            return
        info = getattr(item, "_fixtureinfo", None)
        for name in getattr(info, "names_closure", ()):
            definitions = info.name2fixturedefs.get(name) if info is not None else None
            if definitions and definitions[-1].scope != "function" and definitions[-1].cached_result is not None:
                self.fixture_contexts[item.nodeid].add(_fixture_context(definitions[-1], None))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        failed = report.failed or (report.when == "call" and getattr(report, "wasxfail", None) is not None and report.passed)
        if failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.when == "call" or (report.skipped and report.nodeid not in self.outcomes):
            self.outcomes.setdefault(report.nodeid, "skipped" if report.skipped else "passed")

    # ------------------------------------------------------------ what the plugin and the audit hook tell

    def opened(self, path: str) -> None:
        """A file opened for reading: the test's, and the repository modules' whose code opened it.

        A module that read a file once (a cache, or at import) hands what it read to every later
        caller: each test that runs or imports one of those modules depends on the file too.
        """
        name = relative(path, self.root)
        if name is None or name.endswith((".py", ".pyc", ".sqlite", ".sqlite-journal")) or name.startswith(self.cassettes):
            return
        if self.current is not None:
            self.opened_files[self.current].add(name)
        frame = sys._getframe(2)
        while frame is not None:
            module = relative(frame.f_code.co_filename, self.root)
            if module is not None and module.endswith(".py"):
                self.opened_by_module[module].add(name)
            frame = frame.f_back

    def used_model(self, model: str) -> None:
        if self.current is not None:
            self.models[self.current].add(model)

    def looked_up(self, model: str, key: str, answer_digest: str) -> None:
        if self.current is not None:
            self.lookups[self.current].add((model, key, answer_digest))

    # ------------------------------------------------------------ the records

    def parse(self, path: Path) -> Source | None:
        key = str(path)
        if key not in self._parsed:
            self._parsed[key] = Source.read(path, self.root) if path.suffix == ".py" else None
        return self._parsed[key]

    def records(self, context: str, fingerprint: Callable[[str], str | None], every_source: Callable[[], list[str]]):
        """This process's tests as records, with the states of the files they depend on."""
        lines = self._blocks_by_context()
        closures: dict[str, list[Path]] = {}
        sources: dict[str, SourceState] = {}
        files: dict[str, FileState] = {}

        def source_digests(path: Path) -> dict[str, str] | None:
            name = relative(path, self.root)
            source = self.parse(path)
            if name is None or source is None:
                return None
            if name not in sources:
                info = path.stat()
                sources[name] = SourceState(info.st_mtime_ns, info.st_size, source.blocks)
            return sources[name].blocks

        def file_digest(name: str) -> str:
            if name not in files:
                files[name] = FileState.of(self.root / name) or FileState(0, 0, "")
            return files[name].digest

        records = []
        for nodeid, outcome in self.outcomes.items():
            if nodeid not in self.test_files or self.unreliable:
                continue  # not traced: its record stands, with this outcome
            test_file = Path(self.test_files.get(nodeid, self.root / nodeid.partition("::")[0]))
            if str(test_file) not in closures:
                closures[str(test_file)] = [test_file, *import_closure(test_file, self.search, self.parse)]
            modules = set()
            for path in closures[str(test_file)]:
                digests = source_digests(path)
                if digests is not None:
                    modules.add((relative(path, self.root), digests[MODULE]))
            blocks = set()
            for ran_in in {nodeid, *self.fixture_contexts.get(nodeid, ())}:
                for path, names in lines.get(ran_in, {}).items():
                    digests = source_digests(Path(path))
                    if digests is not None:
                        name = relative(path, self.root)
                        blocks.update((name, block, digests.get(block, "")) for block in names)
            names = set(self.opened_files.get(nodeid, ()))
            for module in {path for path, _ in modules} | {path for path, _, _ in blocks}:
                names |= self.opened_by_module.get(module, set())
            data = {(name, file_digest(name)) for name in names}
            if nodeid in self.spawned:
                data.update((name, file_digest(name)) for name in every_source())
            models = {(model, fingerprint(model) or "") for model in self.models.get(nodeid, ())}
            dependencies = Dependencies(
                context, frozenset(blocks), frozenset(modules), frozenset(data), frozenset(models),
                frozenset(self.lookups.get(nodeid, ())),
            )  # fmt: skip
            records.append(TestRecord(nodeid, outcome, dependencies))
        return records, sources, files

    def _blocks_by_context(self) -> dict[str, dict[str, set[str]]]:
        """context -> file -> the blocks whose lines ran in it."""
        found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        if self.coverage is None:
            return found
        data = self.coverage.get_data()
        for path in data.measured_files():
            source = self.parse(Path(path))
            if source is None:
                continue
            for line, contexts in data.contexts_by_lineno(path).items():
                block = source.block_at(line)
                for context in contexts:
                    if context:
                        found[context][path].add(block)
        return found


def _fixture_context(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest | None) -> str:
    """The context of one set-up of a fixture definition (a parametrized one: per parameter): at its
    set-up from the request, later from what it cached."""
    key = fixturedef.cache_key(request) if request is not None else fixturedef.cached_result[1]
    return f"fixture:{id(fixturedef)}:{id(key) if key is not None and not isinstance(key, (int, str)) else key}"
