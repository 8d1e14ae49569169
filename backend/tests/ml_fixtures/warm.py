"""Warm runs: ``pytest --ml-warm ...`` runs the session in a child forked from a per-user server
that has the ML libraries imported already, so a rerun does not pay their 6–8 s import again.

The server (this file run as a script: it imports nothing of this repository, so edits to the
application or the tests are always picked up) imports torch, transformers, FlagEmbedding,
SQLAlchemy, pytest and its plugins, then waits on a Unix socket. For each run it forks a child
that takes over the caller's working directory, environment, ``sys.path``, arguments and
standard streams (file descriptors passed with SCM_RIGHTS), runs ``pytest.main`` and sends the
exit code back. The server never runs a torch op nor touches CUDA: a process forked after
OpenMP has started deadlocks in its first op, one forked after imports only runs models fine.

Safety: the socket lives in a directory only the user can enter (0700, under
``$XDG_RUNTIME_DIR`` or the model cache directory), the server serves only its own uid
(SO_PEERCRED), never TCP. A changed set of installed packages (or Python) makes the server stale:
it exits and the caller starts a fresh one. It exits by itself after ``$ML_WARM_IDLE_S`` seconds
(default 1800) without a request. Whatever goes wrong, the caller says so in one line and runs cold.

Only the standard library is used here: the client side runs inside the caller's pytest.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import json
import os
import signal
import site
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = (
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.xlm_roberta.modeling_xlm_roberta",
    "FlagEmbedding",
    "sqlalchemy",
    "sqlalchemy.orm",
    "psutil",
    "filelock",
    "huggingface_hub",
    "safetensors",
    "psycopg",
)
#: Options a forked child cannot honour: xdist's workers are fresh interpreters of their own.
COLD_ONLY = ("-n", "--numprocesses", "--dist", "-d", "--tx", "-f", "--looponfail")
STARTUP_TIMEOUT_S = 180
CHILD_VARIABLE = "ML_WARM_CHILD"
_LENGTH = struct.Struct("!I")


def _say(message: str) -> None:
    print(f"ml-warm: {message}", file=sys.stderr, flush=True)


def socket_dir() -> Path:
    """A directory only this user can enter: ``$ML_WARM_DIR``, else under ``$XDG_RUNTIME_DIR`` or the model cache."""
    explicit = os.environ.get("ML_WARM_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "backend-ml-warm"
    cache = os.environ.get("ML_MODEL_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backend-ml-models"
    return Path(cache) / "warm"


def _private_dir() -> Path:
    directory = socket_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


def socket_path() -> Path:
    """One server per Python executable (a virtualenv), per user."""
    key = hashlib.sha256(sys.executable.encode()).hexdigest()[:12]
    return _private_dir() / f"server-{key}.sock"


def packages_fingerprint() -> str:
    """Python, this file, and what is installed (site-packages entries and their mtimes)."""
    dirs = os.environ.get("ML_WARM_PACKAGES_DIRS")
    package_dirs = dirs.split(os.pathsep) if dirs else site.getsitepackages()
    digest = hashlib.sha256(f"{sys.executable}\n{sys.version}\n{Path(__file__).stat().st_mtime_ns}".encode())
    for directory in sorted(package_dirs):
        try:
            entries = sorted((entry.name, entry.stat().st_mtime_ns) for entry in os.scandir(directory))
        except OSError:
            continue
        digest.update(repr((directory, entries)).encode())
    return digest.hexdigest()[:16]


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    frame = _LENGTH.pack(len(data)) + data
    if fds:
        socket.send_fds(conn, [frame], fds)
    else:
        conn.sendall(frame)


def _receive(conn: socket.socket, with_fds: bool = False) -> tuple[dict | None, list[int]]:
    """One message (and the descriptors sent with it); (None, []) when the peer has gone."""
    fds: list[int] = []
    if with_fds:
        data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    else:
        data = conn.recv(65536)
    if not data:
        return None, fds
    while len(data) < _LENGTH.size or len(data) < _LENGTH.size + _LENGTH.unpack(data[: _LENGTH.size])[0]:
        more = conn.recv(65536)
        if not more:
            return None, fds
        data += more
    length = _LENGTH.unpack(data[: _LENGTH.size])[0]
    return json.loads(data[_LENGTH.size : _LENGTH.size + length]), fds


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's uid, from the kernel (SO_PEERCRED: pid, uid, gid)."""
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


# ---------------------------------------------------------------- server


class Server:
    def __init__(self, path: Path, idle_s: float, preload: list[str]):
        self.path, self.idle_s, self.preload = path, idle_s, preload
        self.fingerprint = packages_fingerprint()

    def serve(self) -> None:
        # Bind before the imports: a caller that connects meanwhile waits in the backlog.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        ours = os.stat(self.path).st_ino
        listener.listen(16)
        try:
            _import_pytest_plugins()
            for name in self.preload:
                try:
                    importlib.import_module(name)
                except Exception as exc:  # a missing optional library only costs its import later
                    print(f"preload {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            # The imported libraries' objects live as long as the server: frozen, the children's
            # collections (pytest runs five at the end of a session) no longer walk them, and
            # their pages stay shared instead of being copied on the collector's writes.
            gc.freeze()
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
            listener.settimeout(self.idle_s)
            while True:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    print(f"idle for {self.idle_s:.0f} s: exiting", file=sys.stderr)
                    return
                conn.settimeout(None)
                if self.handle(conn, listener) == "exit":
                    return
        finally:
            with contextlib.suppress(OSError):  # unless a newer server has taken the path over
                if os.stat(self.path).st_ino == ours:
                    self.path.unlink()
            listener.close()

    def handle(self, conn: socket.socket, listener: socket.socket) -> str | None:
        with conn:
            if peer_uid(conn) != os.getuid():
                _send(conn, {"refused": f"this server serves uid {os.getuid()} only"})
                return None
            request, fds = _receive(conn, with_fds=True)
            try:
                if request is None:
                    return None
                if request.get("op") == "stop":
                    _send(conn, {"stopped": os.getpid()})
                    return "exit"
                if request.get("fingerprint") != self.fingerprint:
                    _send(conn, {"stale": "the installed packages or Python changed since it started"})
                    return "exit"
                if request.get("op") == "ping":
                    _send(conn, {"ready": os.getpid()})
                    return None
                if len(fds) != 3:
                    _send(conn, {"refused": "a run needs the caller's stdin, stdout and stderr"})
                    return None
                if os.fork() == 0:
                    listener.close()
                    _child(conn, request, fds)  # never returns
            finally:
                for fd in fds:
                    os.close(fd)
        return None


def _import_pytest_plugins() -> None:
    """Import pytest and its installed plugins as a run does, through the assertion-rewriting import
    hook, before any library imports one of them plainly: a child's run then finds them rewritten
    and warns about none (PytestAssertRewriteWarning), as a cold run does not."""
    import pytest

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as neutral:  # no ini, no conftest: nothing of a repository
        os.chdir(neutral)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                pytest.main(["--version", "-c", os.devnull, "-p", "no:cacheprovider"])
        finally:
            os.chdir(cwd)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the caller's pytest run, report its exit code, exit."""
    code = 3
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["path"]
        sys.argv[:] = request["argv"]
        _send(conn, {"pid": os.getpid()})
        threading.Thread(target=_die_with_caller, args=(conn,), daemon=True).start()
        import pytest

        code = int(pytest.main(request["argv"][1:]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        try:
            _send(conn, {"exit": code})
        finally:
            os._exit(code)


def _die_with_caller(conn: socket.socket) -> None:
    """The caller sends nothing more: end of stream means it is gone, so the run goes too."""
    try:
        conn.recv(1)
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)


# ---------------------------------------------------------------- client


class Unavailable(Exception):
    """The warm server cannot take this run; the message says why, the run goes on cold."""


def _connect(path: Path, timeout: float | None) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    conn.connect(str(path))
    return conn


def _request(path: Path, message: dict, fds: list[int] | None = None, timeout: float | None = STARTUP_TIMEOUT_S):
    conn = _connect(path, timeout)
    _send(conn, message, fds)
    reply, _ = _receive(conn)
    if reply is None:
        conn.close()
        raise Unavailable("the warm server closed the connection")
    return conn, reply


def start_server(path: Path) -> int:
    """Start a server for ``path`` in a session of its own; its output goes to a log beside the socket."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    log = open(path.with_suffix(".log"), "ab")
    process = subprocess.Popen(
        [sys.executable, __file__, "serve", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    log.close()
    deadline = time.monotonic() + 10
    while not path.exists():  # it binds the socket before its imports
        if process.poll() is not None or time.monotonic() > deadline:
            raise Unavailable(f"the warm server did not start (see {path.with_suffix('.log')})")
        time.sleep(0.02)
    return process.pid


def _ready_server(path: Path, fingerprint: str) -> None:
    """Make sure a current server listens at ``path``: start one, or replace a stale or dead one."""
    for _ in range(2):
        try:
            conn, reply = _request(path, {"op": "ping", "fingerprint": fingerprint})
            conn.close()
        except (FileNotFoundError, ConnectionRefusedError):
            if path.exists():
                path.unlink()  # a socket file left by a dead server
                _say("removed the socket of a warm server that is gone")
            _say(f"starting a warm server (pid {start_server(path)}); this run waits for its imports")
            continue
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot reach the warm server: {exc}") from exc
        if "ready" in reply:
            return
        if "stale" in reply:
            _say(f"restarting the warm server: {reply['stale']}")
            _wait_gone(path)
            _say(f"starting a warm server (pid {start_server(path)}); this run waits for its imports")
            continue
        raise Unavailable(reply.get("refused", f"unexpected reply {reply}"))
    raise Unavailable("the warm server did not become ready")


def _wait_gone(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    path.unlink(missing_ok=True)


def run(args: list[str]) -> int | None:
    """Run ``pytest args`` in a child of the warm server; its exit code, or None to run cold."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 2


def _run(args: list[str]) -> int | None:
    if os.environ.get(CHILD_VARIABLE):  # --ml-warm from an ini file reaches the child too
        return None
    cold_only = sorted({a.split("=")[0] for a in args if a.split("=")[0] in COLD_ONLY or (a.startswith("-n") and a[2:].isdigit())})
    if cold_only:
        _say(f"{', '.join(cold_only)}: xdist workers cannot fork from the warm server; running cold")
        return None
    try:
        path = socket_path()
        fingerprint = packages_fingerprint()
        _ready_server(path, fingerprint)
        request = {
            "op": "run",
            "fingerprint": fingerprint,
            "argv": ["pytest", *args],
            "cwd": os.getcwd(),
            "env": {**os.environ, CHILD_VARIABLE: "1"},
            "path": list(sys.path),
        }
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        conn, reply = _request(path, request, fds=[0, 1, 2])
    except (Unavailable, OSError) as exc:
        _say(f"{exc}; running cold")
        return None
    if "pid" not in reply:
        conn.close()
        _say(f"{reply.get('stale') or reply.get('refused') or reply}; running cold")
        return None
    return _follow(conn, reply["pid"])


def _follow(conn: socket.socket, child: int) -> int:
    """Wait for the child's exit code, passing Ctrl-C and termination on to it."""

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        conn.settimeout(None)
        reply, _ = _receive(conn)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        conn.close()
    if reply is None or "exit" not in reply:
        _say("the warm run ended without an exit code")
        return 1
    return reply["exit"]


def stop() -> int:
    """Stop this user's server for this Python, if one runs; exit code 0 either way."""
    try:
        path = socket_path()
        conn, reply = _request(path, {"op": "stop"}, timeout=10)
        conn.close()
    except (FileNotFoundError, ConnectionRefusedError):
        _say("no warm server is running")
        return 0
    except (Unavailable, OSError) as exc:
        _say(f"no warm server answered: {exc}")
        return 0
    _wait_gone(path)
    _say(f"stopped the warm server (pid {reply.get('stopped')})")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    # Run as a script: sys.path[0] is this directory; drop it, so that nothing of the repository is importable.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    preload = os.environ.get("ML_WARM_PRELOAD")
    Server(
        Path(sys.argv[2]),
        idle_s=float(os.environ.get("ML_WARM_IDLE_S", "1800")),
        preload=[m for m in preload.split(",") if m] if preload is not None else list(PRELOAD),
    ).serve()
