"""--ml-warm: runs through a warm server's forked child give a cold run's results, pick up edits,
restart on new packages, refuse other users, pass Ctrl-C on, die with their caller, idle out, and
fall back to cold when they must. Real processes throughout: the server and its children are the
claim. The servers here preload SQLAlchemy only (fast to start), except where torch is the point."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from ml_fixtures import warm

TESTS = """
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def test_passes(test_db):
        assert SparseEmbeddingService(test_db).generate_embedding("glacier")

    def test_fails():
        assert 1 == 2
"""
SLEEPER = """
    import os, time

    def test_sleeps():
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
"""


class WarmTree:
    def __init__(self, ml_tree, monkeypatch, warm_dir):
        self.tree, self.root = ml_tree, ml_tree.root
        self.env = {
            **os.environ,
            "ML_WARM_DIR": str(warm_dir),
            "ML_WARM_PRELOAD": "sqlalchemy",
            "PYTHONDONTWRITEBYTECODE": "",
        }
        for key in ("ML_WARM_DIR", "ML_WARM_PRELOAD"):
            monkeypatch.setenv(key, self.env[key])

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args), cwd=self.root, env={**self.env, **env}, capture_output=True, text=True, timeout=120
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args), cwd=self.root, env={**self.env, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )


@pytest.fixture
def warm_tree(ml_tree, monkeypatch, tmp_path):
    """A tree and a warm server of its own (for the tests that start, stop or replace it)."""
    tree = WarmTree(ml_tree, monkeypatch, tmp_path / "warm")
    yield tree
    warm.stop()


@pytest.fixture(scope="module")
def shared_warm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shared-warm")
    yield directory
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ML_WARM_DIR", str(directory))
        warm.stop()


@pytest.fixture
def shared_warm_tree(ml_tree, monkeypatch, shared_warm_dir):
    """A tree whose runs go to the module's one warm server (started by the first of them)."""
    return WarmTree(ml_tree, monkeypatch, shared_warm_dir)


def started_pid(output: str) -> int:
    line = next(line for line in output.splitlines() if "starting a warm server (pid" in line)
    return int(line.split("(pid ")[1].split(")")[0])


def alive(pid: int) -> bool:
    """Running: a server started from this process stays a zombie until reaped, which is not alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def summary(output: str) -> str:
    return output.strip().splitlines()[-1].split(" in ")[0]


def test_a_warm_run_gives_the_cold_results_output_and_report(warm_tree):
    warm_tree.tree.write("unit/test_mixed.py", TESTS)
    cold = warm_tree.run("-q", "--ml-model-report=cold.json")
    first = warm_tree.run("-q", "--ml-warm", "--ml-model-report=warm.json")
    again = warm_tree.run("-q", "--ml-warm", "--ml-model-report=warm.json")
    assert cold.returncode == first.returncode == again.returncode == 1
    assert summary(cold.stdout) == summary(first.stdout) == summary(again.stdout) == "1 failed, 1 passed"
    assert "ml-warm: starting a warm server" in first.stderr and "ml-warm" not in again.stderr
    for output in (cold.stdout, again.stdout):
        assert "assert 1 == 2" in output and "= ML model loads =" in output
    cold_report, warm_report = (json.loads((warm_tree.root / name).read_text()) for name in ("cold.json", "warm.json"))
    assert cold_report.keys() == warm_report.keys() and warm_report["loads"] == cold_report["loads"] == 0


def test_code_edited_between_two_warm_runs_is_picked_up(shared_warm_tree):
    shared_warm_tree.tree.write("unit/helper.py", "ANSWER = 1\n")
    shared_warm_tree.tree.write("unit/test_edit.py", "from helper import ANSWER\n\ndef test_answer():\n    assert ANSWER == 1\n")
    assert shared_warm_tree.run("-q", "--ml-warm").returncode == 0
    shared_warm_tree.tree.write("unit/helper.py", "ANSWER = 2\n")
    edited = shared_warm_tree.run("-q", "--ml-warm")
    assert edited.returncode == 1 and "assert 2 == 1" in edited.stdout


def test_new_packages_restart_the_server(warm_tree, tmp_path, monkeypatch, capsys):
    packages = tmp_path / "site-packages"
    packages.mkdir()
    monkeypatch.setenv("ML_WARM_PACKAGES_DIRS", str(packages))
    path = warm.socket_path()
    warm._ready_server(path, warm.packages_fingerprint())  # the caller's side, in this process
    first = capsys.readouterr().err
    (packages / "newly_installed-1.0.dist-info").mkdir()
    warm._ready_server(path, warm.packages_fingerprint())
    second = capsys.readouterr().err
    assert "ml-warm: restarting the warm server: the installed packages or Python changed" in second
    old, new = started_pid(first), started_pid(second)
    assert old != new and wait_for(lambda: not alive(old)) and alive(new)


def test_another_user_is_refused(tmp_path, monkeypatch):
    server = warm.Server(tmp_path / "unused.sock", idle_s=1, preload=[])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(warm, "peer_uid", lambda conn: os.getuid() + 1)  # as if another uid connected
    with theirs:
        server.handle(ours, listener=None)
        reply, _ = warm._receive(theirs)
    assert reply == {"refused": f"this server serves uid {os.getuid()} only"}


def test_ctrl_c_interrupts_the_warm_run_as_a_cold_one(shared_warm_tree, tmp_path):
    shared_warm_tree.tree.write("unit/test_sleep.py", SLEEPER)
    pid_file = tmp_path / "child.pid"
    client = shared_warm_tree.start("-q", "--ml-warm", PID_FILE=str(pid_file))
    assert wait_for(pid_file.exists), "the warm run did not start"
    client.send_signal(signal.SIGINT)
    output, _ = client.communicate(timeout=30)
    assert client.returncode == 2 and "KeyboardInterrupt" in output
    assert wait_for(lambda: not alive(int(pid_file.read_text())))


def test_a_killed_caller_takes_its_run_along(shared_warm_tree, tmp_path):
    shared_warm_tree.tree.write("unit/test_sleep.py", SLEEPER)
    pid_file = tmp_path / "child.pid"
    client = shared_warm_tree.start("-q", "--ml-warm", PID_FILE=str(pid_file))
    assert wait_for(pid_file.exists), "the warm run did not start"
    client.kill()
    client.wait()
    assert wait_for(lambda: not alive(int(pid_file.read_text())))


def test_an_idle_server_exits_and_removes_its_socket(warm_tree, monkeypatch):
    monkeypatch.setenv("ML_WARM_IDLE_S", "1")
    pid = warm.start_server(warm.socket_path())
    assert wait_for(lambda: not alive(pid)) and not warm.socket_path().exists()


def test_a_dead_servers_socket_is_cleaned_up(warm_tree):
    warm_tree.tree.write("unit/test_ok.py", "def test_ok():\n    pass\n")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(warm.socket_path()))  # bound, never listening: what a killed server leaves
    stale.close()
    done = warm_tree.run("-q", "--ml-warm")
    assert done.returncode == 0 and summary(done.stdout) == "1 passed"
    assert "ml-warm: removed the socket of a warm server that is gone" in done.stderr


def test_xdist_runs_cold_and_says_why(warm_tree):
    warm_tree.tree.write("unit/test_ok.py", "def test_ok():\n    pass\n")
    done = warm_tree.run("-q", "--ml-warm", "-n", "1")
    assert done.returncode == 0 and summary(done.stdout) == "1 passed"
    assert "ml-warm: -n: xdist workers cannot fork from the warm server; running cold" in done.stderr
    assert not warm.socket_path().exists()


def test_stop_with_and_without_a_server(warm_tree):
    stopped = warm_tree.run("--ml-warm-stop")
    assert stopped.returncode == 0 and "ml-warm: no warm server is running" in stopped.stderr
    pid = warm.start_server(warm.socket_path())
    stopped = warm_tree.run("--ml-warm-stop")
    assert stopped.returncode == 0 and f"ml-warm: stopped the warm server (pid {pid})" in stopped.stderr
    assert wait_for(lambda: not alive(pid)) and not warm.socket_path().exists()


def test_a_child_forked_after_torch_imports_runs_multithreaded_inference(warm_tree):
    warm_tree.tree.write(
        "integration/test_infer.py",
        """
        import os
        import pytest
        import torch
        from app.services.ml_classification_service import MLClassificationService

        @pytest.mark.use_real_models
        def test_batch(test_db):
            assert torch.get_num_threads() > 1 or os.cpu_count() == 1
            texts = ["The striker scored a goal"] * 4 + ["Bake the bread in a hot oven"] * 4
            labels = [r.top.label for r in MLClassificationService(test_db).predict_batch(texts)]
            assert labels == ["sports"] * 4 + ["cooking"] * 4
        """,
    )
    done = warm_tree.run("-q", "--ml-warm", ML_WARM_PRELOAD="torch,transformers,sqlalchemy")  # timeout: no deadlock
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert summary(done.stdout) == "1 passed" and "starting a warm server" in done.stderr
