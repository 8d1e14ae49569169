"""--ml-warm's machinery: runs pick up edits and a server restarts when a file it imported changes;
signals, Ctrl-Z and crashes end a warm run as they end a cold one; the debugger and input() read
the caller's stdin, on a pipe and on a terminal; the server refuses other users and survives any
client (vanishing, silent, concurrent, killed), exits when idle or when its socket goes, and gets
a sibling for other import-time settings; usage errors come through as cold. Real processes
throughout: the server and its children are the claim. The servers here preload SQLAlchemy only
(fast to start); the cold/warm probes that need torch are in test_warm_parity.py, xdist workers
forked from the server in test_warm_workers.py. Most tests share the module's one server
(``shared_warm_tree``)."""

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from _ml_fixtures_warm_core import protocol
from _ml_fixtures_warm_core.identity import Manifest
from _ml_fixtures_warm_core.server import Server
from ml_fixtures.warm import lifecycle, workers
from ml_fixtures.warm.client import xdist_options

pytestmark = pytest.mark.slow  # real processes: `make test-slow` (pytest.ini)

SLEEPER = """
    import os, time

    def test_sleeps():
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
"""
DEBUGGED = """
    def test_breakpoint():
        x = 42
        breakpoint()
        assert x == 43

    def test_input():
        assert input("name? ") == "typed"

    def test_post_mortem():
        assert 6 * 7 == 41
"""


class WarmTree:
    def __init__(self, ml_tree, monkeypatch, warm_dir: Path):
        self.tree, self.root, self.warm_dir = ml_tree, ml_tree.root, warm_dir
        self.env = {
            **os.environ,
            "ML_WARM_DIR": str(warm_dir),
            "ML_WARM_PRELOAD": "sqlalchemy",
            "PYTHONDONTWRITEBYTECODE": "",
            # pytester gives each test a HOME of its own; HOME is part of a server's identity.
            "HOME": str(warm_dir.parent),
        }
        for key in ("ML_WARM_DIR", "ML_WARM_PRELOAD"):
            monkeypatch.setenv(key, self.env[key])

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]

    def run(self, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args), cwd=self.root, env={**self.env, **env}, capture_output=True, text=True,
            timeout=120, input=input,
        )  # fmt: skip

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        """A run in a process group of its own, as a shell starts a job: Ctrl-Z stops it even where this
        pytest's group is orphaned (started in the background of a shell that has exited), in which the
        kernel discards a stop signal."""
        return subprocess.Popen(
            self.command(*args), cwd=self.root, env={**self.env, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, process_group=0,
        )  # fmt: skip

    def server_pids(self) -> list[int]:
        manifests = (Manifest.read(path) for path in sorted(self.warm_dir.glob("server-*.manifest")))
        return [manifest.pid for manifest in manifests if manifest is not None]

    def logs(self) -> str:
        return "".join(path.read_text() for path in self.warm_dir.glob("server-*.log"))


@pytest.fixture
def warm_tree(ml_tree, monkeypatch, tmp_path):
    """A tree and a warm server of its own (for the tests that start, stop or replace it)."""
    tree = WarmTree(ml_tree, monkeypatch, tmp_path / "warm")
    yield tree
    lifecycle.stop()


@pytest.fixture(scope="module")
def shared_warm_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shared-warm") / "warm"
    yield directory
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ML_WARM_DIR", str(directory))
        lifecycle.stop()


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


def test_edits_are_picked_up_and_an_edited_preloaded_file_restarts_the_server(warm_tree, tmp_path):
    """The tests' and the application's code is the child's own import: an edit is picked up with
    the same server. A local patch deep inside an installed package (here one on PYTHONPATH that the
    server preloads) restarts it: the manifest has every file the server imported."""
    deep = tmp_path / "packages" / "warmprobe" / "nested" / "deep.py"
    deep.parent.mkdir(parents=True)
    for package in (deep.parent.parent, deep.parent):
        (package / "__init__.py").write_text("")
    deep.write_text("VALUE = 1\n")
    warm_tree.tree.write("unit/helper.py", "ANSWER = 1\n")
    warm_tree.tree.write(
        "unit/test_edit.py",
        "from helper import ANSWER\nfrom warmprobe.nested.deep import VALUE\n\ndef test_answer():\n    assert ANSWER == VALUE\n",
    )
    env = {"PYTHONPATH": str(tmp_path / "packages"), "ML_WARM_PRELOAD": "warmprobe.nested.deep"}
    first = warm_tree.run("-q", "--ml-warm", **env)
    assert first.returncode == 0, first.stdout + first.stderr
    warm_tree.tree.write("unit/helper.py", "ANSWER = 2\n")
    edited = warm_tree.run("-q", "--ml-warm", **env)
    assert edited.returncode == 1 and "assert 2 == 1" in edited.stdout and edited.stderr == ""
    deep.write_text("VALUE = 2\n")  # in place: same inode, same directory entries
    patched = warm_tree.run("-q", "--ml-warm", **env)
    assert f"ml-warm: restarting the warm server: {deep} changed" in patched.stderr
    assert patched.returncode == 0, patched.stdout + patched.stderr
    old, new = started_pid(first.stderr), started_pid(patched.stderr)
    assert wait_for(lambda: not alive(old)) and alive(new)


def test_another_user_is_refused(tmp_path, monkeypatch):
    server = Server(tmp_path / "server-unused.sock", idle_s=1, preload=[])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(protocol, "peer_uid", lambda conn: os.getuid() + 1)  # as if another uid connected
    with theirs:
        assert not server._admit(ours)
        reply = protocol.receive(theirs)
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


def test_sigterm_ends_a_warm_run_as_a_cold_one_and_ctrl_z_stops_both(shared_warm_tree, tmp_path):
    """Cold, pytest dies by SIGTERM (exit 143 in a shell); warm, the child dies by it and the caller
    by the same signal. Before that, Ctrl-Z (SIGTSTP) stops the child too and fg (SIGCONT) resumes both."""
    shared_warm_tree.tree.write("unit/test_sleep.py", SLEEPER)
    pid_files = [tmp_path / "cold.pid", tmp_path / "warm.pid"]
    cold = shared_warm_tree.start("-q", PID_FILE=str(pid_files[0]))
    warm_client = shared_warm_tree.start("-q", "--ml-warm", PID_FILE=str(pid_files[1]))
    assert wait_for(lambda: all(path.exists() for path in pid_files)), "the runs did not start"
    caller, child = psutil.Process(warm_client.pid), psutil.Process(int(pid_files[1].read_text()))
    warm_client.send_signal(signal.SIGTSTP)
    assert wait_for(lambda: caller.status() == child.status() == psutil.STATUS_STOPPED)
    warm_client.send_signal(signal.SIGCONT)
    assert wait_for(lambda: psutil.STATUS_STOPPED not in (caller.status(), child.status()))
    for client in (cold, warm_client):
        client.send_signal(signal.SIGTERM)
        client.communicate(timeout=30)
    assert [cold.returncode, warm_client.returncode] == [-signal.SIGTERM, -signal.SIGTERM]
    assert wait_for(lambda: not any(alive(int(path.read_text())) for path in pid_files))


def test_sighup_and_a_crash_end_the_warm_run_as_they_end_a_cold_one(shared_warm_tree, tmp_path):
    """Cold, pytest dies by SIGHUP (exit 129), or by the SIGSEGV of a crash (after faulthandler's
    traceback): so do the warm child and its caller."""
    shared_warm_tree.tree.write("unit/test_sleep.py", SLEEPER)
    shared_warm_tree.tree.write(
        "unit/test_crash.py", "import os, signal\n\ndef test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    pid_file = tmp_path / "child.pid"
    client = shared_warm_tree.start("-q", "--ml-warm", "unit/test_sleep.py", PID_FILE=str(pid_file))
    assert wait_for(pid_file.exists), "the warm run did not start"
    client.send_signal(signal.SIGHUP)
    client.communicate(timeout=30)
    assert client.returncode == -signal.SIGHUP and wait_for(lambda: not alive(int(pid_file.read_text())))
    crashed = shared_warm_tree.run("-q", "--ml-warm", "unit/test_crash.py")
    assert crashed.returncode == -signal.SIGSEGV and "Fatal Python error: Segmentation fault" in crashed.stderr


def test_an_ignored_sigint_stays_ignored(shared_warm_tree, tmp_path):
    """A background job of a non-interactive shell has SIGINT ignored; so has its warm child, and
    the caller passes none on."""
    shared_warm_tree.tree.write(
        "unit/test_sigint.py",
        """
        import os, signal, time

        def test_sigint():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
            time.sleep(0.5)
        """,
    )
    pid_file = tmp_path / "child.pid"
    client = subprocess.Popen(
        shared_warm_tree.command("-q", "--ml-warm", "unit/test_sigint.py"), cwd=shared_warm_tree.root,
        env={**shared_warm_tree.env, "PID_FILE": str(pid_file)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert wait_for(pid_file.exists), "the warm run did not start"
    client.send_signal(signal.SIGINT)
    output, _ = client.communicate(timeout=30)
    assert client.returncode == 0 and summary(output) == "1 passed", output


def _run_on_a_terminal(tree: WarmTree, args: list[str], script: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """Run on a pseudo-terminal, answering each prompt of ``script`` (expected output, keys) in turn."""
    master, slave = pty.openpty()
    process = subprocess.Popen(tree.command(*args), cwd=tree.root, env=tree.env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output, position, deadline = b"", 0, time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                output += os.read(master, 65536)
            except OSError:  # the terminal's last writer has gone
                break
        found = output.find(script[0][0], position) if script else -1
        if found >= 0:
            position = found + len(script[0][0])
            os.write(master, script.pop(0)[1])
        if process.poll() is not None and not select.select([master], [], [], 0.1)[0]:
            break
    os.close(master)
    return process.wait(timeout=30), output


@pytest.mark.parametrize("stdin", ["terminal", "pipe"])
def test_the_debugger_input_and_pdb_read_stdin_as_cold(shared_warm_tree, stdin):
    shared_warm_tree.tree.write("unit/test_debugged.py", DEBUGGED)
    script = [(b"(Pdb)", b"x = 43\n"), (b"(Pdb)", b"c\n"), (b"name? ", b"typed\n"), (b"(Pdb)", b"p 6*7\n"), (b"(Pdb)", b"c\n")]

    def run(mode: list[str]) -> tuple[int, bytes]:
        if stdin == "terminal":
            return _run_on_a_terminal(shared_warm_tree, ["-s", "--pdb", *mode], list(script))
        keys = b"".join(key for _, key in script).decode()
        done = shared_warm_tree.run("-s", "--pdb", *mode, "unit/test_debugged.py", input=keys)
        return done.returncode, (done.stdout + done.stderr).encode()

    with ThreadPoolExecutor(2) as pool:  # cold and warm at once
        results = list(pool.map(run, ([], ["--ml-warm"])))
    for code, output in results:
        printed = [line.strip().removeprefix(b"(Pdb)").strip() for line in output.splitlines()]  # a terminal echoes
        assert code == 1 and b"42" in printed and b"1 failed, 2 passed" in output, output[-3000:]


def test_a_client_that_vanishes_or_stays_silent_harms_no_run(warm_tree):
    """Ctrl-C in the first run's start-up wait, a stop whose caller is gone, a client that sends
    nothing or half a request: the server goes on and the next run is served at once."""
    warm_tree.tree.write("unit/test_ok.py", "def test_ok():\n    pass\n")
    first = warm_tree.start("-q", "--ml-warm")
    line = first.stdout.readline()
    assert "starting a warm server" in line, line + first.stdout.read()
    server = started_pid(line)
    assert wait_for(lambda: any(warm_tree.warm_dir.glob("server-*.sock")))  # bound, then it imports
    os.kill(server, signal.SIGSTOP)  # still importing: what connects now waits in the backlog
    try:
        time.sleep(0.3)  # the first run's ping is in the backlog
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=30) == 2 and "ml-warm: interrupted" in first.stdout.read()
        assert not warm_tree.server_pids()  # no manifest yet: the server had not finished its imports
        path = next(warm_tree.warm_dir.glob("server-*.sock"))
        for message in ({"op": "ping"}, {"op": "stop"}):
            gone = protocol.connect(path, timeout=5)
            protocol.send(gone, message)
            gone.close()
        silent = protocol.connect(path, timeout=5)
        partial = protocol.connect(path, timeout=5)
        partial.send(protocol.frame({"op": "ping"})[:6])
    finally:
        os.kill(server, signal.SIGCONT)
    done = warm_tree.run("-q", "--ml-warm")
    assert done.returncode == 0 and summary(done.stdout) == "1 passed" and done.stderr == ""
    assert warm_tree.server_pids() == [server] and alive(server)
    assert "Traceback" not in warm_tree.logs()
    silent.close()
    partial.close()


def test_concurrent_first_runs_start_one_server_quietly(warm_tree):
    warm_tree.tree.write("unit/test_ok.py", "def test_ok():\n    pass\n")
    clients = [warm_tree.start("-q", "--ml-warm") for _ in range(3)]
    outputs = [client.communicate(timeout=120)[0] for client in clients]
    assert [client.returncode for client in clients] == [0, 0, 0], outputs
    assert sum(output.count("ml-warm: starting a warm server") for output in outputs) == 1
    assert not any("Traceback" in output or "running cold" in output for output in [*outputs, warm_tree.logs()])
    assert len(list(warm_tree.warm_dir.glob("server-*.sock"))) == 1 and len(warm_tree.server_pids()) == 1


def test_a_stopped_server_lets_the_run_in_progress_finish_and_waits_without_spinning(warm_tree, tmp_path):
    warm_tree.tree.write(
        "unit/test_waits.py",
        """
        import os, pathlib, time

        def test_waits():
            pathlib.Path(os.environ["PID_FILE"]).write_text(str(os.getpid()))
            go = pathlib.Path(os.environ["GO_FILE"])
            deadline = time.monotonic() + 30
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert go.exists()
        """,
    )
    pid_file, go_file = tmp_path / "child.pid", tmp_path / "go"
    client = warm_tree.start("-q", "--ml-warm", PID_FILE=str(pid_file), GO_FILE=str(go_file))
    assert wait_for(pid_file.exists), "the warm run did not start"
    [server] = [psutil.Process(pid) for pid in warm_tree.server_pids()]
    stopped = warm_tree.run("--ml-warm-stop")
    assert f"ml-warm: stopped the warm server (pid {server.pid})" in stopped.stderr
    before = sum(server.cpu_times()[:2])
    time.sleep(1)
    assert sum(server.cpu_times()[:2]) - before < 0.5, "the server spins while its last run goes on"
    go_file.touch()
    output, _ = client.communicate(timeout=60)
    assert client.returncode == 0 and summary(output) == "1 passed"
    assert wait_for(lambda: not alive(server.pid))


def test_stop_leaves_another_interpreters_server_running(shared_warm_tree, monkeypatch, capsys):
    """Another virtualenv's (another checkout's) server is not this pytest's to stop."""
    shared_warm_tree.tree.write("unit/test_ok.py", "def test_ok():\n    pass\n")
    assert shared_warm_tree.run("-q", "--ml-warm", "unit/test_ok.py").returncode == 0
    [pid] = shared_warm_tree.server_pids()
    monkeypatch.setattr(sys, "executable", "/elsewhere/.venv/bin/python")
    assert lifecycle.stop() == 0
    err = capsys.readouterr().err
    assert "no warm server is running for this interpreter" in err
    assert f"left the warm servers of other interpreters running: pid {pid}, " in err and alive(pid)


def test_a_server_exits_when_idle_or_when_its_socket_is_removed_or_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("ML_WARM_PRELOAD", "")
    paths = {why: tmp_path / f"server-{why}.sock" for why in ("idle", "removed", "replaced")}
    servers = {
        why: lifecycle.start_server(path, {**os.environ, "ML_WARM_IDLE_S": "1" if why == "idle" else "60"})
        for why, path in paths.items()
    }
    manifests = [protocol.ServerFiles.from_socket(paths[why]).manifest for why in ("removed", "replaced")]
    assert wait_for(lambda: all(manifest.exists() for manifest in manifests))
    for path in (paths["removed"], paths["replaced"]):
        path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(paths["replaced"]))
    assert all(server.wait(timeout=30) == 0 for server in servers.values())
    assert not paths["idle"].exists() and not paths["removed"].exists() and paths["replaced"].exists()
    assert not any(path.exists() for path in tmp_path.glob("*.manifest"))
    other.close()


@pytest.mark.parametrize(
    "spec, forkable",
    [
        ("popen", True),
        ("3*popen", True),
        ("popen//chdir=elsewhere", True),
        ("popen//python=python3.12", False),  # the user's own interpreter
        ("popen//dont_write_bytecode", False),
        ("popen//via=proxy", False),
        ("ssh=somehost", False),
        ("socket=127.0.0.1:8888", False),
    ],
)
def test_only_local_popen_workers_fork_from_the_server(spec, forkable):
    """The workers that xdist would start here as a plain ``python -u -c`` (the others, and the
    whole run under --tx without any, stay as they are: test_warm_workers.py runs the rest)."""
    assert workers.forkable(spec) is forkable


@pytest.mark.parametrize(
    "args, addopts, expected",
    [
        (["-n", "auto"], "", "-n auto"),
        (["-nlogical"], "", "-n logical"),
        ([], "-n 2", "-n 2"),
        (["-n", "0"], "", None),
        (["-n", "auto", "--pdb"], "", None),
        (["-n", "2", "--collect-only"], "", None),
        (["--dist", "loadgroup"], "", None),
    ],
)
def test_xdist_is_read_from_the_parsed_options(ml_tree, args, addopts, expected):
    if addopts:
        ini = ml_tree.root / "pytest.ini"
        ini.write_text(ini.read_text().replace("addopts = ", f"addopts = {addopts} "))
    config = ml_tree.pytester.parseconfig(*args)
    assert xdist_options(config) == expected


def test_pytest_usage_errors_come_through_unchanged(shared_warm_tree):
    """The plugin is loaded by -p (pytest.ini), not only by a conftest: --ml-warm is known even
    when the path, and with it every conftest, is missing; the child says what pytest says."""
    done = shared_warm_tree.run("-q", "--ml-warm", "missing/test_x.py")
    assert done.returncode == 4 and done.stderr.strip() == "ERROR: file or directory not found: missing/test_x.py"


def test_a_warm_childs_subprocess_runs_warm_too(shared_warm_tree, tmp_path):
    """Nothing marks the environment of a warm child: a pytest --ml-warm that a test starts is a
    caller of its own, forked from the server too."""
    shared_warm_tree.tree.write(
        "services/inner/test_inner.py",
        "import os\n\ndef test_parent():\n    open(os.environ['PARENT_FILE'], 'w').write(str(os.getppid()))\n",
    )
    shared_warm_tree.tree.write(
        "unit/test_outer.py",
        """
        import os, subprocess, sys

        def test_outer():
            done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--ml-warm", "services/inner"],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "ml-warm" not in done.stderr, done.stderr
            assert not any(name.startswith("ML_WARM_CHILD") for name in os.environ)
        """,
    )
    parent_file = tmp_path / "parent"
    done = shared_warm_tree.run("-q", "--ml-warm", "unit/test_outer.py", PARENT_FILE=str(parent_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(parent_file.read_text()) in shared_warm_tree.server_pids()


def test_other_import_time_settings_a_dead_server_and_stop(shared_warm_tree, capsys):
    """Last: it stops the module's server. OMP_NUM_THREADS is read by OpenMP when torch loads it, in
    the server: a caller with another value gets a server of its own, started with it. One killed
    leaves its socket and manifest: the next run removes them and starts another. ``--ml-warm-stop``
    stops every server of the directory."""
    shared_warm_tree.tree.write("unit/test_ok.py", "def test_ok():\n    pass\n")
    before = shared_warm_tree.server_pids()  # the module's, unless this test runs alone
    other = shared_warm_tree.run("-q", "--ml-warm", "unit/test_ok.py", OMP_NUM_THREADS="1")
    assert other.returncode == 0 and "starting a warm server" in other.stderr
    assert psutil.Process(started_pid(other.stderr)).environ()["OMP_NUM_THREADS"] == "1"
    assert sorted(shared_warm_tree.server_pids()) == sorted([*before, started_pid(other.stderr)])
    os.kill(started_pid(other.stderr), signal.SIGKILL)
    again = shared_warm_tree.run("-q", "--ml-warm", "unit/test_ok.py", OMP_NUM_THREADS="1")
    assert again.returncode == 0 and summary(again.stdout) == "1 passed"
    assert "ml-warm: removed the socket of a warm server that is gone" in again.stderr
    pids = shared_warm_tree.server_pids()
    assert sorted(pids) == sorted([*before, started_pid(again.stderr)]) and all(alive(pid) for pid in pids)
    stopped = shared_warm_tree.run("--ml-warm-stop")
    assert stopped.returncode == 0 and all(f"ml-warm: stopped the warm server (pid {pid})" in stopped.stderr for pid in pids)
    assert wait_for(lambda: not any(alive(pid) for pid in pids)) and not list(shared_warm_tree.warm_dir.glob("server-*.sock"))
    assert lifecycle.stop() == 0 and "ml-warm: no warm server is running" in capsys.readouterr().err
