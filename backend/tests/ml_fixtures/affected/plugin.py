"""Run only what a change affects: the run state of the dependency record and of ``--ml-affected``
(registered as ``ml-affected`` by the library's plugin).

Every run with pytest's cache records what its tests depended on (``recorder.py``), in the process
that ran them; an xdist controller merges its workers' records and writes them. ``--ml-affected``
deselects, at collection, every recorded test none of whose dependencies changed
(``changes.py``) and that passed last time, and says why the others run; ``--ml-affected=REF``
compares against a git revision as well.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ml_fixtures.affected.changes import Now, Reason, SinceRevision, reasons
from ml_fixtures.affected.context import LIBRARY, Context, conftest_files
from ml_fixtures.affected.fingerprints import Fingerprints
from ml_fixtures.affected.record import Dependencies, DependencyRecord, FileState, Snapshot, SourceState, TestRecord
from ml_fixtures.affected.recorder import DependencyRecorder, relative, repository_python_files
from ml_fixtures.cassettes import fingerprint

SNAPSHOT_OUTPUT = "ml_affected"
#: The summary names at most this many reasons.
SHOWN_REASONS = 8
SINCE_LAST_RUN = "last"
FAILED_LAST_TIME = "failed last time"


def answer_digest(answer: object) -> str:
    """How a cassette's answer is kept in the record: a digest, or "" for no answer."""
    if answer is None:
        return ""
    return hashlib.blake2b(json.dumps(answer, sort_keys=True).encode(), digest_size=8).hexdigest()


class AffectedRun:
    """The dependency record's side of one run, and ``--ml-affected``."""

    def __init__(self, config: pytest.Config, models, mode: str | None, settings: str):
        self.config, self.models, self.mode, self.settings = config, models, mode, settings
        self.root = config.rootpath
        cache = getattr(config, "cache", None)
        self.record = DependencyRecord(cache.mkdir("ml-affected") / "dependencies.sqlite") if cache is not None else None
        if mode is not None and self.record is None:
            raise pytest.UsageError(
                "--ml-affected needs pytest's cache (the cacheprovider plugin); it is disabled (-p no:cacheprovider)"
            )
        #: From now on (the collection imports modules that may read data files), unless a run in
        #: this process records already (a pytester session inside a test: the outer run sees it).
        self.recorder: DependencyRecorder | None = None
        if self.record is not None and not DependencyRecorder.nested() and not _measures_coverage(config):
            cassettes = relative(models.settings.cassette_dir, self.root) or str(models.settings.cassette_dir)
            self.recorder = DependencyRecorder(self.root, cassettes)
            self.recorder.begin()
            config.add_cleanup(self.recorder.end)  # also where the session never finishes (a usage error)
        #: The models' fingerprints, for the cassettes (staleness) and the record.
        self.fingerprints = Fingerprints(fingerprint, self._fingerprint_memo)
        self.snapshots: list[Snapshot] = []
        #: nodeid -> why it runs (filled by the selection); None without --ml-affected.
        self.selected: dict[str, list[Reason]] | None = None
        self.deselected = 0
        self.deleted: list[str] = []
        #: The test files with a test whose record is stale: traced this run (None: no record, all are).
        self.stale_files: set[str] | None = None
        self.said = False

    @property
    def controller(self) -> bool:
        """An xdist controller: its workers collect and run the tests."""
        return self.config.pluginmanager.has_plugin("dsession")

    # ------------------------------------------------------------ selection

    def _now(self) -> Now:
        return Now(self.root, self.record.sources(), self.record.files(), self.models.fingerprint, self.models.answer)

    def _context(self) -> Context:
        return Context.of(self.config, self.settings, self.models.project.declared_in)

    def _revision(self) -> SinceRevision | None:
        if self.mode in (None, SINCE_LAST_RUN):
            return None
        try:
            return SinceRevision.of(self.root, self.mode, self.models.settings.cassette_dir)
        except (ValueError, OSError) as exc:
            raise pytest.UsageError(f"--ml-affected={self.mode}: {exc}") from None

    def affected(self, nodeids: list[str]) -> dict[str, list[Reason]]:
        """Of ``nodeids``, those to run, each with why: its recorded dependencies changed, it failed
        last time, or it has no record."""
        recorded = self.record.outcomes()
        now, context, revision = self._now(), self._context(), self._revision()
        contexts = self.record.contexts()
        wanted = {recorded[n][1] for n in nodeids if n in recorded}
        by_depset = {i: reasons(deps, now, context, contexts, revision) for i, deps in self.record.depsets(wanted).items()}
        found = {}
        for nodeid in nodeids:
            if nodeid not in recorded:
                found[nodeid] = [Reason("new (no record yet)")]
                continue
            outcome, depset = recorded[nodeid]
            why = [
                *by_depset.get(depset, [Reason("no record yet")]),
                *([Reason(FAILED_LAST_TIME)] if outcome == "failed" else []),
            ]
            if why:
                found[nodeid] = why
        return found

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
        """Before -k, -m and --lf: the deleted tests are seen among all collected."""
        if self.record is not None and self.record.exists():
            self.deleted = self._deleted(items)

    @pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")  # pytest reads only pytest_* names
    def pytest_collection_modifyitems_select(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """After -k, -m and --lf: among the tests they leave, the affected ones (and the summary of those)."""
        if self.record is None:
            return
        if self.record.exists():
            self.selected = self.affected([item.nodeid for item in items])
            stale = {nodeid for nodeid, why in self.selected.items() if any(r.line != FAILED_LAST_TIME for r in why)}
            self.stale_files = {str(item.path) for item in items if item.nodeid in stale}
        else:
            self.selected = {item.nodeid: [Reason("no dependency record yet")] for item in items}
        if self.mode is None:
            return
        keep = [item for item in items if item.nodeid in self.selected]
        gone = [item for item in items if item.nodeid not in self.selected]
        self.deselected = len(gone)
        if gone:
            config.hook.pytest_deselected(items=gone)
            items[:] = keep
        if not hasattr(config, "workerinput"):
            self._say(len(keep) + len(gone))

    def _deleted(self, items: list[pytest.Item]) -> list[str]:
        """Recorded tests that are gone: their file is, or it was collected whole without them (not
        under ``--lf``, which collects only the failed tests of a file, nor ``file.py::test``)."""
        collected = {item.nodeid for item in items}
        whole = not self.config.getoption("lf", False) and not any("::" in str(arg) for arg in self.config.args)
        files = {nodeid.partition("::")[0] for nodeid in collected} if whole else set()
        return [
            nodeid
            for nodeid in self.record.outcomes()
            if nodeid not in collected
            and (nodeid.partition("::")[0] in files or not (self.root / nodeid.partition("::")[0]).exists())
        ]

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids: list[str]) -> None:
        """On the controller: what a worker collected is what it runs; the reasons come from the record."""
        if self.mode is None or self.said:
            return
        self.selected = self.affected(ids) if self.record.exists() else {i: [Reason("no dependency record yet")] for i in ids}
        self.deselected = None  # the workers know how many
        self._say(None)

    def _say(self, collected: int | None) -> None:
        self.said = True
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is None:
            return
        for line in self.summary(collected):
            terminal.write_line(line)

    def summary(self, collected: int | None) -> list[str]:
        since = "since the last run" if self.mode == SINCE_LAST_RUN else f"since git revision {self.mode} or the last run"
        count = len(self.selected)
        if not count:
            tests = f"the {collected} tests" if collected is not None else "the recorded tests"
            return [f"ml-affected: nothing to run: no dependency of {tests} changed {since}"]
        total = f" of {collected}" if collected is not None else ""
        lines = [f"ml-affected: {count}{total} test{'s' if count != 1 else ''} to run, {since}:"]
        tests, entries = Counter(), {}
        for why in self.selected.values():
            for reason in {r.line: r for r in why}.values():
                tests[reason.line] += 1
                entries.setdefault(reason.line, set()).update(reason.entries)
        for line, n in tests.most_common(SHOWN_REASONS):
            detail = f" ({len(entries[line])} entries)" if entries[line] else ""
            lines.append(f"  {n} test{'s' if n != 1 else ''}: {line}{detail}")
        if len(tests) > SHOWN_REASONS:
            lines.append(f"  ... and {len(tests) - SHOWN_REASONS} other reasons")
        if self.deleted:
            lines.append(f"  {len(self.deleted)} recorded test{'s' if len(self.deleted) != 1 else ''} gone from the suite")
        return lines

    # ------------------------------------------------------------ recording

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """Trace the tests this process runs (none: nothing to start)."""
        if self.recorder is None or self.controller or not session.items or session.config.option.collectonly:
            return
        if self.stale_files is not None and not self.stale_files:
            return  # every record stands: no tracing, no per-test hooks (the outcomes come from the reports)
        excluded = [LIBRARY, *conftest_files(self.config)]
        search = [Path(p) for p in sys.path if relative(p or ".", self.root) is not None or Path(p or ".").resolve() == self.root]
        self.recorder.prepare(excluded, search, self.stale_files)
        self.config.pluginmanager.register(self.recorder, "ml-affected-recorder")

    def used_model(self, model: str) -> None:
        if self.recorder is not None:
            self.recorder.used_model(model)

    def looked_up(self, model: str, key: str, answer: object) -> None:
        if self.recorder is not None:
            self.recorder.looked_up(model, key, answer_digest(answer))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.mode is not None and not self.selected and session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
            session.exitstatus = pytest.ExitCode.OK  # nothing affected is a result, not an error
        if self.record is None or self.config.option.collectonly:
            return  # a collection alone (what would run?) leaves the record as it was
        snapshot = self._snapshot()
        if hasattr(self.config, "workeroutput"):
            self.config.workeroutput[SNAPSHOT_OUTPUT] = _to_json(snapshot)
            return
        for other in self.snapshots:
            snapshot.tests += other.tests
            snapshot.sources |= other.sources
            snapshot.files |= other.files
            snapshot.contexts |= other.contexts
            snapshot.deleted += other.deleted
            snapshot.outcomes |= other.outcomes
        if snapshot.tests:
            # The selection compares each recorded answer with what the cassettes give now, which needs
            # the model's fingerprint: remembered here, a selection with nothing changed computes none.
            for model in {model for test in snapshot.tests for model, _, _ in test.dependencies.lookups}:
                self.models.fingerprint(model)
            snapshot.meta = self._meta()
        if snapshot.tests or snapshot.deleted or snapshot.outcomes:
            self.record.write(snapshot)

    def _snapshot(self) -> Snapshot:
        snapshot = Snapshot(deleted=self.deleted)
        if self.recorder is None:
            return snapshot
        self.recorder.end()
        snapshot.outcomes = self._outcomes_changed()
        if self.recorder.test_files:  # some were traced
            context = self._context()
            tests, sources, files = self.recorder.records(context.digest, self.models.fingerprint, self._every_source)
            snapshot.tests, snapshot.sources, snapshot.files = tests, sources, files
            snapshot.contexts = {context.digest: context.components}
        return snapshot

    def _outcomes_changed(self) -> dict[str, str]:
        """The untraced tests whose outcome is not the recorded one, from the reports the terminal kept
        (on the xdist controller: every worker's)."""
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if terminal is None:
            return {}
        outcomes: dict[str, str] = {}
        for category, reports in terminal.stats.items():
            for report in reports:
                nodeid = getattr(report, "nodeid", None)
                if not nodeid or nodeid in self.recorder.test_files or getattr(report, "when", None) is None:
                    continue
                failed = category in ("failed", "error") or report.failed
                if failed or outcomes.get(nodeid) != "failed":
                    outcomes[nodeid] = "failed" if failed else "skipped" if report.skipped else outcomes.get(nodeid, "passed")
        recorded = self.record.outcomes() if self.record.exists() else {}
        return {nodeid: outcome for nodeid, outcome in outcomes.items() if nodeid in recorded and recorded[nodeid][0] != outcome}

    def _fingerprint_memo(self) -> dict:
        if self.record is None or not self.record.exists():
            return {}
        return json.loads(self.record.meta().get("fingerprints", "{}"))

    def _meta(self) -> dict[str, str]:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.root, capture_output=True, text=True).stdout.strip()
        memo = self._fingerprint_memo() | self.fingerprints.remembered
        return {
            "recorded_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "git_head": head,
            "fingerprints": json.dumps(memo, sort_keys=True),
        }

    def _every_source(self) -> list[str]:
        """Every Python file of the repository (what a test that started other processes may have run)."""
        return sorted(filter(None, (relative(path, self.root) for path in repository_python_files(self.root))))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """On the xdist controller: each worker's records, written with the others at the end."""
        data = getattr(node, "workeroutput", {}).get(SNAPSHOT_OUTPUT)
        if data:
            self.snapshots.append(_from_json(data))


def _measures_coverage(config: pytest.Config) -> bool:
    """pytest-cov or pytest-testmon measures coverage in this run: one tracer a thread, theirs."""
    option = config.option
    testmon = any(getattr(option, name, False) for name in ("testmon", "testmon_noselect", "testmon_forceselect"))
    return testmon or bool(getattr(option, "cov_source", None))


def _to_json(snapshot: Snapshot) -> str:
    return json.dumps(
        {
            "tests": [[t.nodeid, t.outcome, t.dependencies.to_json()] for t in snapshot.tests],
            "sources": {p: [s.mtime_ns, s.size, s.blocks] for p, s in snapshot.sources.items()},
            "files": {p: [f.mtime_ns, f.size, f.digest] for p, f in snapshot.files.items()},
            "contexts": snapshot.contexts,
            "deleted": snapshot.deleted,
            "outcomes": snapshot.outcomes,
        }
    )


def _from_json(text: str) -> Snapshot:
    data = json.loads(text)
    return Snapshot(
        tests=[TestRecord(nodeid, outcome, Dependencies.from_json(deps)) for nodeid, outcome, deps in data["tests"]],
        sources={p: SourceState(*state) for p, state in data["sources"].items()},
        files={p: FileState(*state) for p, state in data["files"].items()},
        contexts=data["contexts"],
        deleted=data["deleted"],
        outcomes=data["outcomes"],
    )
