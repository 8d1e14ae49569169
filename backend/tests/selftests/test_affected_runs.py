"""--ml-affected and --ml-watch in real runs: records written by plain, xdist and warm runs and
merged; the selection composed with -k, paths, --lf, -n and --ml-warm; nothing affected exits 0;
the watch loop runs a cycle per save, one for a burst of saves, cancels a run when saved again,
and ends on Ctrl-C with the last cycle's exit code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_fixtures.affected.record import DependencyRecord
from ml_fixtures.warm import lifecycle

pytestmark = pytest.mark.slow  # real processes: `make test-slow` (pytest.ini)

HELPERS = """
def double(x):
    return 2 * x


def triple(x):
    return 3 * x
"""
TEST_A = """
from helpers import double, triple


def test_double():
    assert double(2) == 4


def test_triple():
    assert triple(2) == 6


def test_plain():
    assert True
"""
TEST_B = """
import os
import time

from helpers import double


def test_b1():
    assert double(3) == 6


def test_fails_while_flagged():
    assert not os.path.exists(os.environ["FLAG"])


def test_waits_while_flagged():
    while os.path.exists(os.environ["SLOW_FLAG"]):
        time.sleep(0.05)
"""


class Tree:
    def __init__(self, ml_tree, tmp_path: Path):
        self.root = ml_tree.root
        ini = self.root / "pytest.ini"
        ini.write_text(ini.read_text().replace(" -p no:cacheprovider", ""))  # the record lives in pytest's cache
        (self.root / "helpers.py").write_text(HELPERS)
        ml_tree.write("unit/test_a.py", TEST_A)
        ml_tree.write("unit/test_b.py", TEST_B)
        self.flag, self.slow_flag = tmp_path / "fail", tmp_path / "slow"
        self.env = {
            **os.environ,
            "FLAG": str(self.flag),
            "SLOW_FLAG": str(self.slow_flag),
            "ML_WARM_DIR": str(tmp_path / "warm"),
            "ML_WARM_PRELOAD": "sqlalchemy",
            "PYTHONDONTWRITEBYTECODE": "",
        }

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300)

    def selected(self, *args: str) -> set[str]:
        done = self.run("--co", "--ml-affected", *args)
        assert done.returncode in (0, 5), done.stdout + done.stderr
        return {line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line and " " not in line}

    def edit(self, old: str, new: str, path: str = "helpers.py") -> None:
        file = self.root / path
        file.write_text(file.read_text().replace(old, new))

    def recorded(self) -> set[str]:
        record = DependencyRecord(self.root / ".pytest_cache" / "d" / "ml-affected" / "dependencies.sqlite")
        return {nodeid.split("::")[-1] for nodeid in record.outcomes()}


@pytest.fixture
def tree(ml_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("ML_WARM_DIR", str(tmp_path / "warm"))
    yield Tree(ml_tree, tmp_path)
    lifecycle.stop()


SAVED = re.compile(r"ml-watch: saved (?!again)")
ALL = {"test_double", "test_triple", "test_plain", "test_b1", "test_fails_while_flagged", "test_waits_while_flagged"}


def test_xdist_records_and_the_selection_composes(tree):
    done = tree.run("-n", "2")
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout + done.stderr
    assert tree.recorded() == ALL  # the workers' records, merged by the controller
    nothing = tree.run("--ml-affected")
    assert nothing.returncode == 0 and "ml-affected: nothing to run: no dependency of the 6 tests changed" in nothing.stdout
    tree.edit("return 3 * x", "return 3 * x + 0")
    assert tree.selected() == {"test_triple"}
    assert tree.selected("-k", "double") == set()
    tree.edit("return 2 * x", "return x + x")
    assert tree.selected() == {"test_triple", "test_double", "test_b1"}
    assert tree.selected("unit/test_b.py") == {"test_b1"}
    assert tree.selected("-k", "b1 or triple") == {"test_b1", "test_triple"}
    parallel = tree.run("--ml-affected", "-n", "2")
    assert parallel.returncode == 0 and "3 passed" in parallel.stdout, parallel.stdout + parallel.stderr
    assert "ml-affected: 3 tests to run, since the last run:" in parallel.stdout
    assert tree.selected() == set()  # those three ran (on workers) and were recorded again


def test_the_selection_is_among_the_tests_k_and_m_leave(tree):
    """A record of some tests, then --ml-affected over the same few: nothing to run, and the tests -k
    left out are not "new" (the selection runs after -k, -m and --lf deselect)."""
    assert tree.run("-k", "not b1").returncode == 0
    nothing = tree.run("--ml-affected", "-k", "not b1")
    assert nothing.returncode == 0, nothing.stdout + nothing.stderr
    assert "ml-affected: nothing to run: no dependency of the 5 tests changed" in nothing.stdout
    assert tree.selected() == {"test_b1"}  # without -k: the one never recorded


def test_failed_last_time_and_lf_and_warm_runs_record_too(tree):
    tree.flag.touch()
    assert tree.run().returncode == 1
    assert tree.selected() == {"test_fails_while_flagged"}
    tree.edit("return 3 * x", "return 3 * x + 0")
    assert tree.selected() == {"test_fails_while_flagged", "test_triple"}
    assert tree.selected("--lf") == {"test_fails_while_flagged"}
    tree.flag.unlink()
    warm = tree.run("--ml-affected", "--ml-warm")
    assert warm.returncode == 0 and "2 passed, 4 deselected" in warm.stdout, warm.stdout + warm.stderr
    assert "  1 test: failed last time" in warm.stdout and "  1 test: helpers.py changed (triple)" in warm.stdout
    assert tree.selected() == set()  # the warm child wrote the record


def wait_for_output(process, lines: list[str], predicate, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate("".join(lines)):
            return True
        time.sleep(0.05)
    return False


def test_the_watch_loop_runs_what_each_save_affects(tree):
    import threading

    assert tree.run().returncode == 0  # the record: the first cycle then runs nothing
    watch = subprocess.Popen(
        tree.command("--ml-watch", "unit"), cwd=tree.root, env=tree.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, process_group=0,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")), daemon=True).start()
    waiting = "ml-watch: waiting for the next save"
    try:
        assert wait_for_output(watch, lines, lambda out: out.count(waiting) == 1), "".join(lines)
        assert "ml-affected: nothing to run" in "".join(lines)
        tree.edit("return 3 * x", "return 3 * x + 0")
        assert wait_for_output(watch, lines, lambda out: out.count(waiting) == 2), "".join(lines)
        assert "1 passed, 5 deselected" in "".join(lines)
        # a burst: two files saved at once make one cycle
        tree.edit("return 2 * x", "return x + x")
        tree.edit("assert True", "assert 1", "unit/test_a.py")
        assert wait_for_output(watch, lines, lambda out: out.count(waiting) == 3), "".join(lines)
        assert len(SAVED.findall("".join(lines))) == 2
        # saved again while a run goes: that run is cancelled, the next one runs
        tree.slow_flag.touch()
        tree.edit("import os\n", "import os\nSLOW = True\n", "unit/test_b.py")  # its three tests, the last one waits
        assert wait_for_output(watch, lines, lambda out: len(SAVED.findall(out)) == 3)
        time.sleep(1.5)  # in test_waits_while_flagged
        tree.flag.touch()
        tree.edit("return x + x", "return 2 * x")
        assert wait_for_output(watch, lines, lambda out: "the run in progress is cancelled" in out)
        tree.slow_flag.unlink()  # the new cycle runs test_b.py's tests again: the cancelled one recorded nothing
        assert wait_for_output(watch, lines, lambda out: out.count(waiting) == 4), "".join(lines)
        assert " failed" in "".join(lines).split("the run in progress is cancelled")[-1]  # the new cycle: flagged to fail
        os.killpg(watch.pid, signal.SIGINT)
        assert watch.wait(timeout=30) == 1  # the last cycle's exit code
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
    assert "ml-watch: stopped; the last run's exit code: 1" in "".join(lines)
