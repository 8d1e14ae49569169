"""Which cassette entries each test used, and whether a run can speak for the whole suite.

Every run notes, per test (its node id), the cassette entries it used, as :class:`EntryRef` value
objects in two kinds (:class:`Use`): *replayed* (a fake model answered from the entry:
``Replay.get``) and *recorded* (a real model call of the test gives the entry: recorded now under
``--ml-record=once|rewrite``, or held already in the cassette of the test's module, which that
call would record). The run's :class:`CassetteUsage` is ``MLModels.usage``::

    used = ml_models(config).usage.of("backend/tests/unit/test_x.py::test_y")
    used.replayed, used.recorded, used.entries        # frozensets of EntryRef

xdist workers send theirs to the controller (``to_dict`` / ``merge``), which then holds the whole
run's; ``--ml-cassette-usage=PATH`` writes it with the run's :class:`Selection`, and
``python -m ml_fixtures.unused`` merges the files of a split run's shards.

A :class:`Selection` says whether a run selected every test of the suite and every test passed: only
then are the entries no test used unused (``--ml-record=prune`` removes them).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(frozen=True, order=True)
class EntryRef:
    """One cassette entry: its cassette (the path under the cassette directory, with ``/``), model and key."""

    cassette: str
    model: str
    key: str

    def to_list(self) -> list[str]:
        return [self.cassette, self.model, self.key]


class Use(enum.StrEnum):
    #: A fake model answered from the entry.
    REPLAYED = "replayed"
    #: A real model call of the test gives the entry (recorded now, or by ``--ml-record`` in its module's cassette).
    RECORDED = "recorded"


@dataclass(frozen=True)
class UsedEntries:
    """What one test used."""

    replayed: frozenset[EntryRef] = frozenset()
    recorded: frozenset[EntryRef] = frozenset()

    @property
    def entries(self) -> frozenset[EntryRef]:
        return self.replayed | self.recorded


class CassetteUsage:
    """Per test, the entries it replayed and recorded."""

    def __init__(self) -> None:
        self._tests: dict[str, dict[Use, set[EntryRef]]] = {}

    def note(self, test: str, ref: EntryRef, use: Use) -> None:
        self._tests.setdefault(test, {Use.REPLAYED: set(), Use.RECORDED: set()})[use].add(ref)

    def of(self, test: str) -> UsedEntries:
        """What ``test`` (a node id) used; empty for a test that used no entry."""
        uses = self._tests.get(test)
        if uses is None:
            return UsedEntries()
        return UsedEntries(frozenset(uses[Use.REPLAYED]), frozenset(uses[Use.RECORDED]))

    def tests(self) -> list[str]:
        """The tests that used an entry, sorted."""
        return sorted(self._tests)

    def used(self) -> set[EntryRef]:
        """Every entry that a test used."""
        return {ref for uses in self._tests.values() for refs in uses.values() for ref in refs}

    def cassettes(self) -> set[str]:
        return {ref.cassette for ref in self.used()}

    def to_dict(self) -> dict:
        return {
            test: {use.value: sorted(ref.to_list() for ref in refs) for use, refs in uses.items() if refs}
            for test, uses in sorted(self._tests.items())
        }

    def merge(self, data: dict) -> None:
        """Add what ``to_dict`` gave elsewhere (an xdist worker, a shard)."""
        for test, uses in data.items():
            for use, refs in uses.items():
                for ref in refs:
                    self.note(test, EntryRef(*ref), Use(use))


_WORST = {"passed": 0, "skipped": 1, "failed": 2}


@dataclass
class Selection:
    """What a run selected, and how its tests ended.

    A run *selected every test* when nothing on its command line narrowed it (:meth:`narrowing`) and
    every collected test ran: nothing deselected (``-k``, ``-m``, ``--deselect``, a pytest-split
    group), nothing left when it stopped (``-x``). It is *complete* when, besides, every test
    passed: a test that failed or was skipped may not have made the calls it makes, and the
    entries only it uses would look unused. Shards merge: together they ran every test.
    """

    #: Every test collected, the deselected ones included.
    collected: set[str] = field(default_factory=set)
    #: Each test that ran: "passed", "skipped" (xfail included) or "failed" (an error too), the worst of its phases.
    outcomes: dict[str, str] = field(default_factory=dict)
    #: What on the command line made the run narrower than the suite (see :meth:`narrowing`).
    narrowed: list[str] = field(default_factory=list)
    #: pytest-split's ``(group, splits)`` of each shard merged here.
    groups: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of_run(cls, config: pytest.Config) -> Selection:
        splits, group = config.getoption("splits", None), config.getoption("group", None)
        return cls(narrowed=narrowing(config), groups=[(group, splits)] if splits and group else [])

    def note_report(self, report: pytest.TestReport) -> None:
        outcome = "skipped" if hasattr(report, "wasxfail") else report.outcome  # an xfail, or an xpass, did not pass as such
        previous = self.outcomes.get(report.nodeid, "passed")
        self.outcomes[report.nodeid] = max(previous, outcome, key=_WORST.__getitem__)

    def unrun(self) -> set[str]:
        return self.collected - self.outcomes.keys()

    def not_passed(self) -> dict[str, str]:
        return {test: outcome for test, outcome in sorted(self.outcomes.items()) if outcome != "passed"}

    @property
    def selected_all(self) -> bool:
        return bool(self.collected) and not self.narrowed and not self.unrun()

    @property
    def complete(self) -> bool:
        return self.selected_all and not self.not_passed()

    def reasons(self) -> list[str]:
        """Why the run cannot speak for the whole suite (empty when it is complete)."""
        reasons = list(self.narrowed)
        if not self.collected:
            reasons.append("no test was collected")
        unrun = self.unrun()
        if unrun:
            split = ""
            if self.groups:
                seen = ", ".join(str(group) for group, _ in sorted(set(self.groups)))
                split = f" (pytest-split group(s) {seen} of {self.groups[0][1]})"
            reasons.append(f"{len(unrun)} of {len(self.collected)} tests did not run{split}, e.g. {min(unrun)}")
        not_passed = self.not_passed()
        if not_passed:
            first = next(iter(not_passed.items()))
            reasons.append(f"{len(not_passed)} tests did not pass, e.g. {first[0]} ({first[1]})")
        return reasons

    def to_dict(self) -> dict:
        return {
            "collected": sorted(self.collected),
            "outcomes": dict(sorted(self.outcomes.items())),
            "narrowed": self.narrowed,
            "groups": [list(group) for group in self.groups],
        }

    def merge(self, data: dict) -> None:
        self.collected |= set(data["collected"])
        for test, outcome in data["outcomes"].items():
            previous = self.outcomes.get(test, "passed")
            self.outcomes[test] = max(previous, outcome, key=_WORST.__getitem__)
        self.narrowed += [reason for reason in data["narrowed"] if reason not in self.narrowed]
        self.groups += [tuple(group) for group in data["groups"]]


PRUNE_NEEDS = (
    "--ml-record=prune removes the cassette entries that no test used, so it needs a run of the whole suite "
    "in which every test passes: no -k, -m, --deselect, --lf, --sw, --ignore or narrower test path. "
    "For the shards of a split run, write each one's usage with --ml-cassette-usage=PATH and prune after merging "
    "them: python -m ml_fixtures.unused --prune usage-*.json"
)


def prune_refusal(reasons: list[str], what: str = "--ml-record=prune") -> str:
    """Why prune (``what``) removes nothing, and what it needs."""
    return f"{what} removes nothing: " + "; ".join(reasons) + ".\n" + PRUNE_NEEDS


def prune_refusal_at_start(config: pytest.Config) -> str | None:
    """What the command line alone tells: a narrowed run, or one shard of a split run, cannot prune."""
    reasons = narrowing(config)
    splits, group = config.getoption("splits", None), config.getoption("group", None)
    if splits and group:
        reasons.append(f"this is pytest-split's group {group} of {splits}, one shard")
    return prune_refusal(reasons) if reasons else None


def narrowing(config: pytest.Config) -> list[str]:
    """What on the command line selects a part of the suite; pytest-split's group is not here (shards merge)."""
    option = vars(config.option)  # --lf and --sw come from plugins that a run may leave out
    reasons = [
        f"{flag} {option[name]!r}" for flag, name in (("-k", "keyword"), ("-m", "markexpr"), ("--deselect", "deselect"))
        if option.get(name)
    ]
    reasons += [flag for flag, name in (("--lf", "lf"), ("--sw", "stepwise")) if option.get(name)]
    ignored = (("--ignore", "ignore"), ("--ignore-glob", "ignore_glob"))
    reasons += [f"{flag} {option[name]}" for flag, name in ignored if option.get(name)]
    return reasons + _narrower_paths(config)


def _narrower_paths(config: pytest.Config) -> list[str]:
    """Test paths narrower than the suite's: its ``testpaths``, else the root directory."""
    if config.args_source is pytest.Config.ArgsSource.TESTPATHS:
        return []
    root = config.rootpath
    suite = [root / path for path in config.getini("testpaths")] or [root]
    given = [(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args]
    whole = {path for arg, path in zip(config.args, given) if "::" not in arg and path.is_dir()}
    missing = [path for path in suite if not any(path.resolve().is_relative_to(top) for top in whole)]
    if not missing:
        return []
    shown = ", ".join(_shown(path, root) for path in missing)
    return [f"test paths {' '.join(config.args)} (narrower than the suite's {shown})"]


def _shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) and path != root else str(path)


def write_usage(path: str | Path, usage: CassetteUsage, selection: Selection, cassette_dir: str) -> None:
    """``--ml-cassette-usage=PATH``: this run's usage and selection, for merging with other shards'."""
    data = {"version": 1, "cassette_dir": cassette_dir, "selection": selection.to_dict(), "tests": usage.to_dict()}
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_usage(paths: list[str | Path]) -> tuple[CassetteUsage, Selection, str]:
    """The usage files of shards, merged; their cassette directory (they must agree)."""
    usage, selection, directories = CassetteUsage(), Selection(), set()
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        usage.merge(data["tests"])
        selection.merge(data["selection"])
        directories.add(data["cassette_dir"])
    if len(directories) != 1:
        raise ValueError(f"the usage files name different cassette directories: {sorted(directories)}")
    return usage, selection, directories.pop()
