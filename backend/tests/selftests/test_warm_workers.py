"""``--ml-warm -n N``: xdist's workers are children forked from the warm server, each what execnet's
fresh ``python -u -c`` would have been. The same tree run with cold workers and warm ones gives
the same outcomes, exit code, failure output and load report, and the same probed process state
(streams, path, environment, flags, ``__main__``, signals); ``-n auto`` goes warm too; a crashed
worker is reported and replaced as cold; a stale or unreachable server makes the workers start
cold with one line; a warm worker runs torch on its thread budget. Real processes: the server's
children are the claim. The plain tests' servers preload SQLAlchemy only; the torch test's server
preloads torch and transformers."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ml_fixtures.parallel import usable_cpus
from ml_fixtures.warm import lifecycle
from selftests.test_warm import WarmTree, started_pid, summary
from selftests.test_warm_parity import difference

pytestmark = pytest.mark.slow  # real processes: `make test-slow` (pytest.ini)

#: In every test module: each worker, whichever tests scheduling gives it, writes its state.
PROBE = """
    import json, os, random, signal, sys, warnings
    import pytest

    @pytest.fixture(autouse=True)
    def probe(worker_id):
        main = sys.modules["__main__"]
        umask = os.umask(0)
        os.umask(umask)
        state = {
            "ppid": os.getppid(),
            "executable": sys.executable,
            "argv": sys.argv,
            "orig_argv": sys.orig_argv,
            "flags": list(sys.flags),
            "path": sys.path,
            "environ": {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_TESTRUNUID", "PYTEST_CURRENT_TEST")},
            "cwd": os.getcwd(),
            "umask": umask,
            "ignored": sorted(s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN),
            "sigint": str(signal.getsignal(signal.SIGINT)),
            "stdio": [[s.mode, s.line_buffering, s.write_through, s.encoding, s.errors, type(s.buffer).__name__]
                      for s in (sys.__stdin__, sys.__stdout__, sys.__stderr__)],
            "main": [sorted(k for k in vars(main) if k.startswith("__")), repr(main.__loader__), main.__spec__],
            "warnoptions": sys.warnoptions,
            "draw": random.random(),
        }
        with open(os.path.join(os.environ["PROBE_DIR"], f"{worker_id}.json"), "w") as out:
            json.dump(state, out)
"""
OUTCOMES = """
    @pytest.mark.parametrize("n", range(4))
    def test_passes_too(n):
        pass

    def test_passes():
        pass

    def test_fails():
        assert 6 * 7 == 41

    @pytest.mark.skip(reason="not today")
    def test_skipped():
        pass
"""
PPID = """
    import os

    def test_parent():
        with open(os.path.join(os.environ["PROBE_DIR"], f"ppid-{os.getpid()}"), "w") as out:
            out.write(str(os.getppid()))
"""


@pytest.fixture(scope="module")
def workers_warm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("workers-warm") / "warm"
    yield directory
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ML_WARM_DIR", str(directory))
        lifecycle.stop()


@pytest.fixture
def tree(ml_tree, monkeypatch, workers_warm_dir, tmp_path):
    """A tree whose warm runs go to the module's one server (SQLAlchemy preloaded), and a probe directory."""
    tree = WarmTree(ml_tree, monkeypatch, workers_warm_dir)
    tree.env["PROBE_DIR"] = str(tmp_path / "probes")
    return tree


def probes(tree: WarmTree, into: str) -> dict[str, dict]:
    """The probe files of the last run, moved into ``into`` (the next run writes the same names)."""
    directory = Path(tree.env["PROBE_DIR"])
    moved = directory.rename(directory.with_name(into))
    directory.mkdir()
    return {path.stem: json.loads(path.read_text()) for path in moved.glob("*.json")}


def parents(tree: WarmTree) -> set[int]:
    directory = Path(tree.env["PROBE_DIR"])
    return {int(path.read_text()) for path in directory.glob("ppid-*")}


def failures(output: str) -> str:
    """The failure section, as printed, less which worker ran the test (scheduling decides)."""
    return re.sub(r"\[gw\d+\]", "[gw]", output[output.index("= FAILURES =") : output.index("short test summary info")])


def test_warm_workers_give_the_cold_workers_results_output_report_and_state(tree):
    tree.tree.write("integration/test_a.py", PROBE + OUTCOMES)
    tree.tree.write("integration/test_b.py", PROBE + "\n    def test_b():\n        pass\n")
    Path(tree.env["PROBE_DIR"]).mkdir()
    report = tree.tree.report
    cold = tree.run("-q", "-n", "2", "-rA", f"--ml-model-report={report}")
    cold_report, cold_state = json.loads(report.read_text()), probes(tree, "cold")
    warm_run = tree.run("-q", "-n", "2", "-rA", f"--ml-model-report={report}", "--ml-warm")
    warm_report, warm_state = json.loads(report.read_text()), probes(tree, "warm")

    assert cold.returncode == warm_run.returncode == 1, warm_run.stdout + warm_run.stderr
    assert summary(cold.stdout) == summary(warm_run.stdout) == "1 failed, 6 passed, 1 skipped"
    assert failures(cold.stdout) == failures(warm_run.stdout)
    assert cold.stderr == "" and [line for line in warm_run.stderr.splitlines() if "starting a warm server" not in line] == []
    for data in (cold_report, warm_report):  # memory aside
        data.pop("peak_rss_mb")
        data["peak_rss_mb_by_worker"] = sorted(data["peak_rss_mb_by_worker"])
    assert cold_report == warm_report and warm_report["peak_rss_mb_by_worker"] == ["gw0", "gw1", "main"]  # merged

    server = tree.server_pids()
    assert len(server) == 1 and started_pid(warm_run.stderr) == server[0]
    assert sorted(cold_state) == sorted(warm_state) == ["gw0", "gw1"]
    draws = [state.pop("draw") for run in (cold_state, warm_state) for state in run.values()]
    assert len(set(draws)) == 4  # each worker seeded afresh
    assert {state.pop("ppid") for state in warm_state.values()} == set(server)  # forked from the server
    assert {state.pop("ppid") for state in cold_state.values()} != set(server)
    for worker in ("gw0", "gw1"):
        assert difference(warm_state[worker], cold_state[worker]) == {}


def test_n_auto_goes_warm(tree):
    tree.tree.write("integration/test_ppid.py", PPID)
    Path(tree.env["PROBE_DIR"]).mkdir()
    done = tree.run("-n", "auto", "--ml-warm")  # not -q: the header has the decision
    assert done.returncode == 0 and " 1 passed in " in done.stdout, done.stdout + done.stderr
    assert "ml-models: -n auto → " in done.stdout
    assert parents(tree) == set(tree.server_pids())
    assert "running cold" not in done.stderr and "start cold" not in done.stderr


def test_a_crashed_worker_is_reported_and_replaced_as_in_a_cold_run(tree):
    """One worker: it crashes in the first test; xdist replaces it, and the replacement (started
    through the same launcher) runs the rest, forked from the server too."""
    tree.tree.write(
        "integration/test_crash.py",
        PPID.replace("test_parent", "test_2_parent") + "\n    def test_1_crash():\n        os.kill(os.getpid(), 11)\n",
    )
    Path(tree.env["PROBE_DIR"]).mkdir()
    runs = [tree.run("-n", "1", *args) for args in ([], ["--ml-warm"])]
    for done in runs:
        assert done.returncode == 1 and " 1 failed, 1 passed in " in done.stdout, done.stdout + done.stderr
        assert "replacing crashed worker gw0" in done.stdout
        assert "worker 'gw0' crashed while running 'integration/test_crash.py::test_1_crash'" in done.stdout
        assert "Fatal Python error: Segmentation fault" in done.stderr
    cold, warm_run = (done.stdout.splitlines() for done in runs)
    assert cold[:-1] == warm_run[:-1]  # all but the time taken
    parent_pids = parents(tree)
    assert len(parent_pids) == 2 and set(tree.server_pids()) < parent_pids  # the cold run's and the warm one's


SABOTAGE = """
    import os, signal, time
    from pathlib import Path

    from _ml_fixtures_warm_core import protocol
    from _ml_fixtures_warm_core.identity import Manifest

    def pytest_sessionstart(session):
        '''On the controller, after its server check and before xdist starts the workers.'''
        if hasattr(session.config, "workerinput"):
            return
        if os.environ["SABOTAGE"] == "stale":
            deep = Path(os.environ["DEEP"])
            deep.write_text(deep.read_text() + "CHANGED = True\\n")
            return
        for path in protocol.socket_dir().glob("server-*.manifest"):
            os.kill(Manifest.read(path).pid, signal.SIGKILL)
"""


@pytest.mark.parametrize("sabotage", ["stale", "unreachable"])
def test_a_stale_or_unreachable_server_makes_the_workers_cold_with_one_line(ml_tree, monkeypatch, tmp_path, sabotage):
    """A server of its own (the sabotage stops or outdates it). Its preloaded module, on
    PYTHONPATH, is edited, or the server killed, between the controller's check and the workers'
    start: each launcher starts its worker cold; the controller says why once."""
    packages = tmp_path / "packages"
    deep = packages / "warmprobe" / "deep.py"
    deep.parent.mkdir(parents=True)
    (deep.parent / "__init__.py").write_text("")
    deep.write_text("VALUE = 1\n")
    (packages / "sabotage.py").write_text(__import__("textwrap").dedent(SABOTAGE))
    tree = WarmTree(ml_tree, monkeypatch, tmp_path / "warm")
    tree.env |= {"PYTHONPATH": str(packages), "ML_WARM_PRELOAD": "warmprobe.deep", "PROBE_DIR": str(tmp_path / "probes")}
    tree.tree.write("integration/test_ppid.py", PPID)
    Path(tree.env["PROBE_DIR"]).mkdir()
    try:
        done = tree.run("-q", "-p", "sabotage", "-n", "2", "--ml-warm", SABOTAGE=sabotage, DEEP=str(deep))
        server = started_pid(done.stderr)
    finally:
        lifecycle.stop()
    assert done.returncode == 0 and summary(done.stdout) == "1 passed", done.stdout + done.stderr
    cold_lines = [line for line in done.stderr.splitlines() if line.endswith("; xdist workers start cold")]
    expected = f"the warm server is out of date: {deep} changed" if sabotage == "stale" else "cannot reach the warm server"
    assert len(cold_lines) == 1 and cold_lines[0].startswith(f"ml-warm: {expected}"), done.stderr
    assert server not in parents(tree)


INFERENCE = """
    import os
    import pytest
    import torch
    from app.services.ml_classification_service import MLClassificationService

    TASKS_AT_IMPORT = len(os.listdir("/proc/self/task"))

    @pytest.mark.use_real_models
    @pytest.mark.parametrize("n", range(2))
    def test_inference(n, test_db):
        budget = int(os.environ["BUDGET"])
        # the xdist budget is the ceiling: the other run's workers, at the same time, may take a share
        threads = torch.get_num_threads()
        assert 1 <= threads <= budget and os.environ["OMP_NUM_THREADS"] == str(budget)
        torch.ones(4_000_000).sin_()  # a parallel region: OpenMP starts its pool (once a process)
        assert len(os.listdir("/proc/self/task")) - TASKS_AT_IMPORT >= threads - 1
        texts = ["The striker scored a goal"] * 4 + ["Bake the bread in a hot oven"] * 4
        labels = [r.top.label for r in MLClassificationService(test_db).predict_batch(texts)]
        assert labels == ["sports"] * 4 + ["cooking"] * 4
        with open(os.path.join(os.environ["PROBE_DIR"], f"ppid-{os.getpid()}"), "w") as out:
            out.write(str(os.getppid()))
"""


def test_warm_workers_run_torch_inference_on_their_thread_budget(ml_tree, monkeypatch, tmp_path):
    """``-n 1``: the one worker's budget is every CPU, so it runs multi-threaded (OpenMP starts
    its pool in the child: the server never did); ``-n 2`` on two CPUs: one thread each, not
    torch's default of one per CPU, although torch was imported (in the server) before the
    budget was known. The two runs go at once, so a worker may take less than its budget while the
    other run's workers run models (the server's share of the cores: test_shared_cores.py)."""
    tree = WarmTree(ml_tree, monkeypatch, tmp_path / "warm")
    tree.env |= {
        "ML_WARM_PRELOAD": "torch,transformers,transformers.models.bert.modeling_bert,sqlalchemy",
        "PROBE_DIR": str(tmp_path / "probes"),
    }
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        tree.env.pop(name, None)
    tree.tree.write("integration/test_inference.py", INFERENCE)
    Path(tree.env["PROBE_DIR"]).mkdir()
    cpus = usable_cpus()
    try:
        with ThreadPoolExecutor(2) as pool:  # both at once: one starts the server, the other waits for it
            def run(n):
                return tree.run("-n", str(n), "--ml-warm", BUDGET=str(max(1, cpus // n)))

            runs = list(zip((1, 2), pool.map(run, (1, 2))))
        servers = tree.server_pids()
    finally:
        lifecycle.stop()
    assert len(servers) == 1 and sum("starting a warm server" in done.stderr for _, done in runs) == 1
    for workers, done in runs:  # not -q: the header has the budget
        assert done.returncode == 0 and " 2 passed in " in done.stdout, done.stdout + done.stderr
        assert f"ml-models: {workers} xdist workers × {max(1, cpus // workers)} torch thread" in done.stdout
    assert parents(tree) == set(servers)
