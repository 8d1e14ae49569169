"""The benchmark's selection section: what the dependency record costs, what ``--ml-affected`` adds
to a collection when nothing changed, what it and pytest-testmon select for each kind of edit (and
miss), and how soon ``--ml-watch`` and pytest-watcher report a saved edit.

Every timing is a median over alternating runs in one script (this machine's speed drifts).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APP_TREES = ["backend/tests/unit", "backend/tests/services", "backend/tests/integration"]
GENERATED_TESTS = 3000
#: Pairs of collection-only runs per benchmark run in the overhead measure.
OVERHEAD_PAIRS = 3


def _stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _session_seconds(output: str) -> float:
    found = re.findall(r" in ([0-9.]+)s", output)
    return float(found[-1]) if found else float("nan")


def _pytest(root: Path, args: list[str], env: dict | None = None, python: str = sys.executable) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:randomly", *args], cwd=root, env={**os.environ, **(env or {})},
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode not in (0, 5):
        raise RuntimeError(f"pytest {' '.join(args)} in {root} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def record_cost(workdir: Path, runs: int) -> dict:
    """This repository's application trees, one process: no record; a record written from nothing
    (every test traced); a record kept (nothing stale: outcomes only). pytest's session seconds."""
    kept = workdir / "cache-kept"
    _pytest(REPO, ["-n", "0", "-o", f"cache_dir={kept}", *APP_TREES])
    found: dict[str, list[float]] = {"no record (-p no:cacheprovider)": [], "record written (all traced)": [], "record kept": []}
    for run in range(runs):
        fresh = workdir / f"cache-fresh-{run}"
        configs = {
            "no record (-p no:cacheprovider)": ["-p", "no:cacheprovider"],
            "record written (all traced)": ["-o", f"cache_dir={fresh}"],
            "record kept": ["-o", f"cache_dir={kept}"],
        }
        for name, args in configs.items():
            _, output = _pytest(REPO, ["-n", "0", *args, *APP_TREES])
            found[name].append(_session_seconds(output))
            print(f"run {run + 1}/{runs} selection record cost {name}: {found[name][-1]:.1f} s", file=sys.stderr)
    tests = int(re.search(r"(\d+) passed", output).group(1))
    return {"trees": APP_TREES, "tests": tests, "configurations": {name: _stat(values) for name, values in found.items()}}


def _generated(root: Path, tests: int) -> None:
    """``tests`` unit tests on the fakes, shaped like the benchmark's, 10 a module."""
    sys.path[:0] = [str(REPO / "backend"), str(REPO / "backend" / "tests"), str(HERE)]
    from suite import Sizes, generate

    generate(root, Sizes(sparse_modules=0, classifier_modules=0, unit_modules=tests // 10, tests_per_unit_module=10))
    ini = root / "pytest.ini"
    ini.write_text(ini.read_text().replace(" -p no:cacheprovider", ""))  # the record lives in pytest's cache


def overhead(workdir: Path, runs: int) -> dict:
    """Wall of a collection-only run: with an empty cache (no record), and with ``--ml-affected`` and nothing changed;
    ``OVERHEAD_PAIRS * runs`` pairs, alternating, the overhead per pair."""
    generated = workdir / "generated"
    generated.mkdir()
    _generated(generated, GENERATED_TESTS)
    trees = {
        "this repository's suite": (REPO, ["-m", "not slow"]),
        f"{GENERATED_TESTS} generated unit tests": (generated, ["unit"]),
    }
    results = {}
    for name, (root, paths) in trees.items():
        cache = workdir / f"cache-overhead-{len(results)}"
        _pytest(root, ["-n", "0", "-o", f"cache_dir={cache}", *paths])  # the record (everything traced once)
        plain, selected = [], []
        for run in range(OVERHEAD_PAIRS * runs):  # a tenth of a second in runs of seconds: more pairs than elsewhere
            empty = workdir / f"cache-empty-{len(results)}-{run}"  # pytest's cache on, as users run it: no record in it
            plain.append(_pytest(root, ["--co", "-o", f"cache_dir={empty}", *paths])[0])
            seconds, output = _pytest(root, ["--co", "--ml-affected", "-o", f"cache_dir={cache}", *paths])
            if "ml-affected: nothing to run" not in output:
                raise RuntimeError(f"--ml-affected selected tests where nothing changed:\n{output[-2000:]}")
            selected.append(seconds)
            difference = selected[-1] - plain[-1]
            print(f"run {run + 1}/{OVERHEAD_PAIRS * runs} selection overhead {name}: {difference:+.3f} s", file=sys.stderr)
        tests = int(re.search(r"(\d+) tests? changed", output).group(1)) if re.search(r"(\d+) tests? changed", output) else None
        results[name] = {
            "tests": tests,
            "collect_only_s": _stat(plain),
            "ml_affected_collect_only_s": _stat(selected),
            "overhead_ms": _stat([1000 * (s - p) for s, p in zip(selected, plain)]),
        }
    return results


def edits(workdir: Path, bench_python: str) -> dict:
    """For each edit of the edit set: the tests that fail in a full run, what ``--ml-affected`` and
    pytest-testmon select, and what each misses."""
    sys.path[:0] = [str(REPO / "backend"), str(REPO / "backend" / "tests")]
    from selftests import edit_set

    ours = edit_set.Scratch(workdir / "ours", workdir / "warm-edits")
    theirs = edit_set.Scratch(workdir / "testmon", workdir / "warm-edits", python=bench_python, warm=False)
    ours.run()
    baseline = theirs.run("--testmon")
    if "passed" not in baseline.stdout:
        raise RuntimeError(f"pytest --testmon baseline failed:\n{baseline.stdout}{baseline.stderr}")
    found = {}
    try:
        testmon_data = theirs.root / ".testmondata"
        kept = testmon_data.read_bytes()
        for edit in edit_set.EDITS:
            for scratch in (ours, theirs):
                edit.apply(scratch.root)
            try:
                failing = ours.failing()
                selected, _ = ours.selected()
                testmon, _ = theirs.selected(selector=("--testmon",))
            finally:
                for scratch in (ours, theirs):
                    edit_set.undo(scratch.root)
                testmon_data.write_bytes(kept)  # its collection-only run updates what it knows of the files
            found[edit.kind] = {
                "failing": sorted(failing),
                "ml_affected": {"selected": len(selected), "missed": sorted(failing - selected)},
                "testmon": {"selected": len(testmon), "missed": sorted(failing - testmon)},
            }
            print(f"selection edit {edit.kind}: ours {len(selected)}, testmon {len(testmon)}", file=sys.stderr)
    finally:
        subprocess.run([sys.executable, "-m", "pytest", "--ml-warm-stop"], cwd=ours.root, env=ours.env, capture_output=True)
    return {"tests": len(edit_set.ALL_TESTS), "edits": found}


class _Lines(threading.Thread):
    """A process's output, line by line, each with the time it came."""

    def __init__(self, process: subprocess.Popen):
        super().__init__(daemon=True)
        self.process, self.lines = process, []

    def run(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append((time.perf_counter(), line))

    def wait_for(self, pattern: str, after: float, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if when >= after and re.search(pattern, line):
                    return when
            time.sleep(0.01)
        raise RuntimeError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(line for _, line in self.lines)[-3000:]}")


def _wait_until_idle(watcher: subprocess.Popen, lines: _Lines, saved: float, timeout: float = 180) -> None:
    """Until the cycle has ended, not only printed its summary line: pytest-watcher drops a save that comes
    while its pytest is still exiting (it clears its trigger after the run), and --ml-watch says when it waits."""
    if "--ml-watch" in watcher.args:
        lines.wait_for("waiting for the next save", saved, timeout)
        return
    deadline = time.monotonic() + timeout
    while psutil.Process(watcher.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)


def watch_latency(workdir: Path, runs: int, bench_python: str) -> dict:
    """From a saved one-test edit in the integration tree to the run's summary line: ``--ml-watch``
    (warm, the affected test) against pytest-watcher (a fresh pytest of the tree on each save)."""
    sys.path[:0] = [str(REPO / "backend"), str(REPO / "backend" / "tests")]
    from selftests import edit_set

    summary = r"\d+ (passed|failed)"
    scratch = edit_set.Scratch(workdir / "watch", workdir / "warm-watch", python=bench_python)
    scratch.run()  # the record, and the warm server
    target = scratch.root / "backend/tests/integration/test_real.py"
    tree, venv = "backend/tests/integration", Path(bench_python).parent
    watchers = {
        "--ml-watch (warm, affected tests)": [bench_python, "-m", "pytest", "-q", "--ml-watch", tree],
        "pytest-watcher (ptw, fresh pytest)": [str(venv / "ptw"), "--runner", str(venv / "pytest"), ".", "-q", tree],
    }
    found: dict[str, list[float]] = {name: [] for name in watchers}
    for name, command in watchers.items():
        process = subprocess.Popen(
            command, cwd=scratch.root, env=scratch.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = _Lines(process)
        lines.start()
        try:
            if "--ml-watch" in command:
                lines.wait_for("waiting for the next save", 0)  # its first cycle runs at once
            time.sleep(2)  # settled: the watcher is waiting
            for run in range(runs):
                text = target.read_text()
                saved = time.perf_counter()
                edit = ("in the final", "in the final ") if run % 2 == 0 else ("in the final ", "in the final")
                target.write_text(text.replace(*edit))  # a space in a test's string, then taken out again
                found[name].append(lines.wait_for(summary, saved) - saved)
                print(f"run {run + 1}/{runs} selection watch {name}: {found[name][-1]:.2f} s", file=sys.stderr)
                _wait_until_idle(process, lines, saved)
                time.sleep(2)
        finally:
            process.terminate()
            process.wait(timeout=30)
    subprocess.run([bench_python, "-m", "pytest", "--ml-warm-stop"], cwd=scratch.root, env=scratch.env, capture_output=True)
    return {name: _stat(values) for name, values in found.items()}


def section(runs: int) -> dict:
    bench_python = sys.executable
    with tempfile.TemporaryDirectory(prefix="ml-bench-selection-") as tmp:
        workdir = Path(tmp)
        result = {
            "record_cost": record_cost(workdir, runs),
            "overhead": overhead(workdir, runs),
            "edits": edits(workdir, bench_python),
            "watch": watch_latency(workdir, runs, bench_python),
        }
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def markdown(section: dict) -> list[str]:
    cost = section["record_cost"]
    lines = [
        f"Selection: the dependency record's cost on this repository's application trees ({cost['tests']} tests, -n 0, "
        "pytest's session seconds), median [min–max]:",
        "",
        "| configuration | session s |",
        "|---|---|",
        *(f"| {name} | {_range(stat)} |" for name, stat in cost["configurations"].items()),
        "",
        "`--ml-affected` with nothing changed, over a collection-only run on an empty cache (wall; the overhead per "
        f"pair of neighbouring runs, {len(next(iter(section['overhead'].values()))['overhead_ms']['runs'])} pairs):",
        "",
        "| suite | collect only s | --ml-affected --co s | overhead ms |",
        "|---|---|---|---|",
        *(
            f"| {name} | {_range(r['collect_only_s'], 2)} | {_range(r['ml_affected_collect_only_s'], 2)} | "
            f"{_range(r['overhead_ms'], 0)} |"
            for name, r in section["overhead"].items()
        ),
        "",
        f"Each kind of edit on the edit set ({section['edits']['tests']} tests): the tests that fail in a full run, "
        "and what each selector selects (and misses):",
        "",
        "| edit | failing | --ml-affected | pytest-testmon |",
        "|---|---|---|---|",
    ]
    for kind, e in section["edits"]["edits"].items():
        ours, theirs = e["ml_affected"], e["testmon"]
        lines.append(
            f"| {kind} | {len(e['failing'])} | {ours['selected']} ({len(ours['missed'])} missed) | "
            f"{theirs['selected']} ({len(theirs['missed'])} missed) |"
        )
    lines += [
        "",
        "From a saved one-test edit in the integration tree to the run's summary line (s):",
        "",
        "| watcher | s |",
        "|---|---|",
    ]
    lines += [f"| {name} | {_range(stat, 2)} |" for name, stat in section["watch"].items()]
    return lines


def _range(stat: dict, digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}–{stat['max']:.{digits}f}]"
