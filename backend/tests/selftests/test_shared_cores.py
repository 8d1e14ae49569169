"""Concurrent runs share the cores: the warm server's board gives each run that uses models its share
of the CPUs and follows runs as they start and end; a budget the user set stays; a cold run's
header names the other runs of the project that compete with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _ml_fixtures_warm_core import cores
from ml_fixtures.parallel import other_runs, other_runs_line
from ml_fixtures.warm import lifecycle
from selftests.test_warm import WarmTree, summary


@pytest.fixture
def board(monkeypatch) -> cores.Board:
    """A board as a warm child sees it, this process in slot 0."""
    board = cores.Board()
    monkeypatch.setattr(cores, "BOARD", board)
    monkeypatch.setattr(cores, "SLOT", 0)
    board.hold(0, 1000)
    return board


def test_a_run_alone_keeps_every_core_and_shares_them_with_runs_that_use_models(board):
    assert cores.share(cpus=8, ceiling=8) == 8
    board.hold(1, 1001)  # a run that has not used a model yet takes nothing
    assert cores.share(cpus=8, ceiling=8) == 8
    for slot in (1, 2, 3):
        board.hold(slot, 1000 + slot)
        board.running_models(slot)
    assert cores.runs_with_models() == 4 and cores.share(cpus=8, ceiling=8) == 2
    assert cores.share(cpus=2, ceiling=2) == 1  # never below one thread
    assert cores.share(cpus=8, ceiling=1) == 1  # an xdist worker's budget is the ceiling
    for pid in (1001, 1002, 1003):
        board.release(pid)
    assert cores.share(cpus=8, ceiling=8) == 8 and board.free_slot() == 1


def test_outside_a_warm_child_there_is_no_share(monkeypatch):
    monkeypatch.setattr(cores, "BOARD", None)
    assert cores.share(cpus=8, ceiling=8) is None and cores.runs_with_models() == 0


#: Starts ``sleep 30`` as a grandchild that outlives its parent (so it is not this process's descendant),
#: named ``argv[2]`` in ``argv[1]``, and prints its pid.
ORPHAN = """
import os, sys
read, write = os.pipe()
if os.fork() == 0:
    pid = os.fork()
    if pid:
        os.write(write, str(pid).encode())
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # not the capture's pipes: their reader would wait for it
        os.dup2(null, fd)
    os.chdir(sys.argv[1])
    os.execv("/bin/sleep", [sys.argv[2], "30"])
os.close(write)
print(os.read(read, 20).decode())
"""


def test_other_pytest_runs_of_the_project_are_found_and_named(tmp_path):
    """A process whose command runs pytest in the project, not this one's ancestor nor descendant,
    is named; one elsewhere is not, nor one that is not pytest."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "tests").mkdir(parents=True)
    elsewhere.mkdir()
    started = [
        int(subprocess.run([sys.executable, "-c", ORPHAN, str(where), name], capture_output=True, text=True, check=True).stdout)
        for where, name in ((project / "tests", "pytest"), (elsewhere, "pytest"), (project, "sleeper"))
    ]
    try:
        assert [pid for pid, _ in other_runs(project)] == [started[0]]
        line = other_runs_line(project)
        assert line.startswith(f"ml-models: 1 other pytest run of this project is using the CPUs (pid {started[0]}: pytest 30)")
        assert "--ml-warm" in line
    finally:
        for pid in started:
            os.kill(pid, signal.SIGKILL)
    assert other_runs_line(tmp_path / "nothing-runs-here") is None


#: Two runs at once: each waits for the other at its first test, so that both run models together,
#: then records its threads; run A also waits for run B's end, then records its threads again.
TOGETHER = """
    import os, time
    import pytest
    import torch

    pytestmark = pytest.mark.use_real_models
    HERE, THERE = os.environ["RUN"], os.environ["OTHER"]
    PROBES = os.environ["PROBE_DIR"]

    def wait_for(path, timeout=60):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            assert time.monotonic() < deadline, f"{path} never came"
            time.sleep(0.02)

    def record(name):
        with open(os.path.join(PROBES, f"{HERE}-{name}"), "w") as out:
            out.write(str(torch.get_num_threads()))

    def test_1_meet(test_db):
        open(os.path.join(PROBES, f"{HERE}-started"), "w").close()
        wait_for(os.path.join(PROBES, f"{THERE}-started"))

    def test_2_together(test_db):
        record("together")
        open(os.path.join(PROBES, f"{HERE}-recorded"), "w").close()
        wait_for(os.path.join(PROBES, f"{THERE}-recorded"))

    def test_3_wait_for_the_other_to_end(test_db):
        if HERE == "a":
            from _ml_fixtures_warm_core import cores
            deadline = time.monotonic() + 60
            while cores.runs_with_models() > 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def test_4_after(test_db):
        record("after")
"""


@pytest.mark.slow  # real warm runs
def test_concurrent_warm_runs_share_the_cores_and_follow_each_other(ml_tree, monkeypatch, tmp_path):
    cpus = cores.usable_cpus()
    tree = WarmTree(ml_tree, monkeypatch, tmp_path / "warm")
    probes = tmp_path / "probes"
    probes.mkdir()
    tree.env |= {"ML_WARM_PRELOAD": "torch,transformers,sqlalchemy", "PROBE_DIR": str(probes)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        tree.env.pop(name, None)
    tree.tree.write("integration/test_together.py", TOGETHER)
    tree.run("--ml-warm", "--collect-only", "-q")  # the server, started before the two runs
    try:
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda pair: tree.run("--ml-warm", RUN=pair[0], OTHER=pair[1]), (("a", "b"), ("b", "a"))))
    finally:
        lifecycle.stop()
    for done in runs:
        assert done.returncode == 0 and summary(done.stdout).endswith("4 passed"), done.stdout + done.stderr
        assert "torch threads shared with the warm server's other runs that use models" in done.stdout  # the header
    threads = {path.name: int(path.read_text()) for path in probes.iterdir() if path.name.endswith(("together", "after"))}
    half = max(1, cpus // 2)
    assert threads == {"a-together": half, "b-together": half, "a-after": cpus, "b-after": half}
    report = runs[0].stdout
    assert f"torch threads (shared with the warm server's other runs, {cpus} CPUs): " in report
    if cpus > 1:  # the steps: every core, then half while both ran, then every core again
        assert f"→ {cpus} (1 run with models, at integration/test_together.py::test_4_after)" in report


@pytest.mark.slow  # real warm runs
def test_a_budget_the_user_set_stays(ml_tree, monkeypatch, tmp_path):
    """``torch.set_num_threads`` in a conftest is the user's: the warm run leaves it and says so."""
    tree = WarmTree(ml_tree, monkeypatch, tmp_path / "warm")
    tree.env |= {"ML_WARM_PRELOAD": "torch,sqlalchemy"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        tree.env.pop(name, None)
    conftest = Path(tree.root / "integration" / "conftest.py")
    conftest.write_text(conftest.read_text() + "\n\nimport torch\n\ntorch.set_num_threads(1)\n")
    tree.tree.write(
        "integration/test_mine.py",
        """
        import pytest
        import torch

        @pytest.mark.use_real_models
        def test_threads_are_mine(test_db):
            assert torch.get_num_threads() == 1
        """,
    )
    try:
        done = tree.run("--ml-warm")
    finally:
        lifecycle.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    if cores.usable_cpus() > 1:
        assert "torch threads left as the user set them (torch.set_num_threads(1) at integration/test_mine.py::" in done.stdout


def test_the_board_counts_the_server_s_children_in_a_subprocess():
    """The board is shared memory kept across fork: what a child writes, its parent reads."""
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "import importlib.util as u; s = u.spec_from_file_location('c', sys.argv[1] + '/cores.py'); c = u.module_from_spec(s);"
        "s.loader.exec_module(c); b = c.Board(); b.hold(0, -1); pid = os.fork()\n"
        "if pid == 0:\n    b.running_models(0); os._exit(0)\n"
        "os.waitpid(pid, 0); print(b.runs_with_models()); b.release(-1); print(b.runs_with_models())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(Path(cores.__file__).parent)], capture_output=True, text=True)
    assert done.stdout.split() == ["1", "0"], done.stderr
