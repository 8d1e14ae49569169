"""Warm runs: ``pytest --ml-warm ...`` runs the session in a child forked from a per-user server
that has the ML libraries imported already, so a rerun does not pay their 6–8 s import again.

The server (this file run as a script: it imports nothing of this repository, so edits to the
application or the tests are always picked up) imports torch, transformers, FlagEmbedding,
SQLAlchemy, pytest and its plugins, then waits on a Unix socket. For each run it forks a child
that becomes what a fresh ``python -m pytest`` of the caller would be (see :func:`_become`): the
caller's standard streams (file descriptors passed with SCM_RIGHTS, taken before pytest's capture
replaced them), working directory, environment, ``sys.path``, ``sys.argv``, warning filters, umask,
resource limits, nice value, CPU affinity, signal mask and ignored signals, and freshly seeded
random generators. The server reaps the child and sends its wait status back: the caller exits
with that code, or dies by the same signal. The server never runs a torch op nor touches CUDA: a
process forked after OpenMP has started deadlocks in its first op, one forked after imports only
runs models fine.

What cannot be re-applied in a forked process (what the interpreter and the preloaded libraries
read once, at start-up or import: see :data:`IMPORT_TIME_PREFIXES`) is part of the server's
identity: a caller with other values gets a server of its own (one socket per identity).

Under xdist (``--ml-warm -n N``) the caller stays xdist's controller and its workers are the
server's children: each worker's gateway spec runs this file as ``worker`` in place of execnet's
``python -u -c <bootstrap>``, and that launcher has the server fork a child that becomes that
interpreter and runs the bootstrap (:class:`WarmWorkers`, :func:`launch_worker`).

The server is one thread around a selector: a client that sends nothing, or vanishes at any point,
delays and harms no other. It exits when its socket file is removed or replaced, after
``$ML_WARM_IDLE_S`` seconds without a request (default 1800), or on ``--ml-warm-stop``; runs in
progress finish first. After its imports it writes a manifest beside the socket: every file of
every module it imported, with sizes and modification times. The caller checks those before each
run (a few milliseconds) and replaces a server whose files changed.

Safety: the socket lives in a directory only the user can enter (0700, under ``$XDG_RUNTIME_DIR``
or the model cache directory), the server serves only its own uid (SO_PEERCRED), never TCP.
Whatever goes wrong, the caller says so in one line and runs cold.

The server side uses only the standard library; the client side (in the caller's pytest) also uses
filelock, so that concurrent first runs start one server.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import marshal
import os
import re
import resource
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from pathlib import Path

#: What a server imports when ``ML_WARM_PRELOAD`` does not say (the plugin sets it from the
#: project's declaration: its ``warm_preload`` and each model's ``preload``).
PRELOAD = ("torch", "transformers")
#: Environment variables read once, by the interpreter at start-up (``PYTHON*``, locale, the dynamic
#: loader, malloc) or by a preloaded library at import (thread pools, the model hubs' offline and
#: cache settings, devices): a child cannot take the caller's values over, so they are part of the
#: server's identity. A variable read at import that is missing here is frozen at server start.
IMPORT_TIME_PREFIXES = (
    "PYTHON", "LC_", "LD_", "MALLOC_", "GLIBC_",
    "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "BLIS_", "VECLIB_", "NUMEXPR_", "NUMPY_",
    "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "HIP_", "ROCM_",
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "SAFETENSORS_", "USE_", "SQLALCHEMY_",
)  # fmt: skip
IMPORT_TIME_NAMES = (
    "HOME", "USER", "LOGNAME", "TMPDIR", "LANG", "XDG_CACHE_HOME", "DO_NOT_TRACK", "DISABLE_TELEMETRY", "ML_WARM_PRELOAD",
)  # fmt: skip
#: ... except these, which every child re-applies exactly (warning filters) or reads at use.
REAPPLIED = ("PYTHONWARNINGS", "PYTHONBREAKPOINT", "PYTHONSTARTUP")
#: Signals the caller passes on while its run goes: the terminal's to the child's process group
#: (as the terminal sends them to a cold run's), the others to the child alone.
TERMINAL_SIGNALS = ("SIGINT", "SIGQUIT", "SIGTSTP", "SIGCONT", "SIGWINCH")
PROCESS_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM")
STARTUP_TIMEOUT_S = 180
HANDSHAKE_TIMEOUT_S = 10
CHECK_PERIOD_S = 1.0
_LENGTH = struct.Struct("!I")
_MAX_FRAME = 16 << 20


def say(message: str) -> None:
    print(f"ml-warm: {message}", file=sys.stderr, flush=True)


def socket_dir() -> Path:
    """A directory only this user can enter: ``$ML_WARM_DIR``, else under ``$XDG_RUNTIME_DIR`` or the user's cache."""
    explicit = os.environ.get("ML_WARM_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "ml-fixtures-warm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ml-fixtures-warm"


def _private_dir() -> Path:
    directory = socket_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


# ---------------------------------------------------------------- identity


def read_at_import(name: str) -> bool:
    return name not in REAPPLIED and (name in IMPORT_TIME_NAMES or name.startswith(IMPORT_TIME_PREFIXES))


def _interpreter_args() -> list[str]:
    """Command-line options that give a new interpreter this one's ``sys.flags`` and ``-X`` options
    (``-W`` aside: warning filters are re-applied in each child)."""
    args = [arg for arg in subprocess._args_from_interpreter_flags() if not arg.startswith("-W")]
    for name, value in sys._xoptions.items():
        option = name if value is True else f"{name}={value}"
        if option not in args:
            args += ["-X", option]
    return args


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a server must share with its callers: the interpreter, its options, the CPUs it may
    use (OpenMP sizes its pool from them at load) and the variables read at import."""

    settings: dict

    @classmethod
    def of_this_process(cls, defaults: dict[str, str] | None = None) -> Identity:
        """``defaults``: what this run's configuration puts into the environment unless set (so a
        library imported during the cold run would have read them)."""
        environ = {**(defaults or {}), **os.environ}
        variables = {
            name: value
            for name, value in sorted(environ.items())
            if read_at_import(name) and not (name.startswith("PYTHON") and not value)  # empty = unset, for Python
        }
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return cls(
            {
                "executable": sys.executable,
                "version": sys.version,
                "flags": list(sys.flags),
                "xoptions": sorted((name, str(value)) for name, value in sys._xoptions.items()),
                "affinity": affinity,
                "environment": variables,
            }
        )

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]

    def difference(self, other: dict) -> str:
        """The first setting where ``other`` differs, in words."""
        for name, mine in self.settings.items():
            theirs = other.get(name)
            if name == "environment" and theirs != mine:
                variable = next(v for v in sorted({*mine, *theirs}) if mine.get(v) != theirs.get(v))
                return f"{variable}={theirs.get(variable)!r} there, {mine.get(variable)!r} here"
            if theirs != mine:
                return f"{name}: {theirs!r} there, {mine!r} here"
        return "no difference"

    @staticmethod
    def server_environment(defaults: dict[str, str] | None) -> dict[str, str]:
        """This environment with ``defaults`` where unset, less what each child re-applies (a server
        importing under PYTHONWARNINGS=error would fail its imports)."""
        environ = {name: value for name, value in os.environ.items() if name not in REAPPLIED}
        return {**(defaults or {}), **environ}


@dataclasses.dataclass(frozen=True)
class ServerFiles:
    """The files of one identity's server: socket, manifest, start-up lock, log."""

    directory: Path
    key: str

    def _path(self, suffix: str) -> Path:
        return self.directory / f"server-{self.key}{suffix}"

    @property
    def socket(self) -> Path:
        return self._path(".sock")

    @property
    def manifest(self) -> Path:
        return self._path(".manifest")

    @property
    def lock(self) -> Path:
        return self._path(".lock")

    @property
    def log(self) -> Path:
        return self._path(".log")

    @classmethod
    def from_socket(cls, path: Path) -> ServerFiles:
        return cls(path.parent, path.name.removeprefix("server-").removesuffix(".sock"))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a server wrote after its imports: who it is and the files its modules came from."""

    server_id: str
    pid: int
    identity: dict
    files: list[str]
    stats: list[tuple[int, int]]
    top_level: frozenset[str]
    sys_path: list[str]

    @staticmethod
    def of_this_server(server_id: str, identity: Identity) -> Manifest:
        main = sys.modules["__main__"].__file__
        files = {sys.executable, os.path.abspath(main)}
        top_level = set()
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if isinstance(file, str) and os.path.isabs(file):
                files.add(file)
                top_level.add(name.partition(".")[0])
        paths = sorted(path for path in files if os.path.exists(path))
        stats = [(info.st_mtime_ns, info.st_size) for info in map(os.stat, paths)]
        top_level.discard("__main__")
        return Manifest(server_id, os.getpid(), identity.settings, paths, stats, frozenset(top_level), list(sys.path))

    def write(self, path: Path) -> None:
        data = dataclasses.asdict(self) | {"top_level": sorted(self.top_level)}
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(marshal.dumps(data))
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        try:
            data = marshal.loads(path.read_bytes())
            return cls(**data | {"top_level": frozenset(data["top_level"])})
        except (OSError, EOFError, ValueError, TypeError, KeyError):
            return None

    def changed(self) -> str | None:
        """The first file that changed or went since the server imported it, in words."""
        try:
            if [(info.st_mtime_ns, info.st_size) for info in map(os.stat, self.files)] == self.stats:
                return None
        except OSError:
            pass
        for path, recorded in zip(self.files, self.stats):
            try:
                info = os.stat(path)
            except OSError:
                return f"{path} is gone"
            if (info.st_mtime_ns, info.st_size) != recorded:
                return f"{path} changed"
        return None

    def shadowed(self, caller_path: list[str]) -> str | None:
        """A module the server imported that this run's ``sys.path`` would take from elsewhere."""
        for directory in caller_path:
            if directory in self.sys_path:
                continue
            try:
                entries = os.listdir(directory or ".")
            except OSError:
                continue
            for entry in entries:
                name = next((entry[: -len(s)] for s in importlib.machinery.all_suffixes() if entry.endswith(s)), entry)
                if name not in self.top_level:
                    continue
                # A module file or a regular package shadows; a directory without __init__ does not.
                if name != entry or any(
                    os.path.exists(os.path.join(directory, entry, f"__init__{s}")) for s in importlib.machinery.all_suffixes()
                ):
                    return f"{entry} in {directory or os.getcwd()} would shadow the warm server's {name}"
        return None


# ---------------------------------------------------------------- the wire


def _frame(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return _LENGTH.pack(len(data)) + data


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    frame = _frame(message)
    sent = socket.send_fds(conn, [frame], fds) if fds else 0
    conn.sendall(frame[sent:])


def _receive(conn: socket.socket) -> dict | None:
    """One message; None when the peer has gone."""
    data = b""
    while len(data) < _LENGTH.size or len(data) < _LENGTH.size + _LENGTH.unpack(data[: _LENGTH.size])[0]:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    return json.loads(data[_LENGTH.size : _LENGTH.size + _LENGTH.unpack(data[: _LENGTH.size])[0]])


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's uid, from the kernel (SO_PEERCRED: pid, uid, gid)."""
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


# ---------------------------------------------------------------- server


@dataclasses.dataclass
class _Pending:
    """A connection whose request has not arrived whole yet."""

    deadline: float
    data: bytes = b""
    fds: list[int] = dataclasses.field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class Server:
    def __init__(self, path: Path, idle_s: float, preload: list[str]):
        self.files = ServerFiles.from_socket(path)
        self.idle_s, self.preload = idle_s, preload
        self.identity = Identity.of_this_process()
        self.server_id = f"{os.getpid()}-{time.time_ns()}"
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.inode: tuple[int, int] | None = None
        self.pending: dict[socket.socket, _Pending] = {}
        self.runs: dict[int, socket.socket | None] = {}  # child pid -> its caller's connection
        self.environment_added: dict[str, str] = {}
        self.stop_requested = False
        self.last_activity = time.monotonic()
        self.wake_fds: tuple[int, ...] = ()

    def serve(self) -> None:
        # Bind before the imports: a caller that connects meanwhile waits in the backlog.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.files.socket))
        except OSError as exc:
            print(f"cannot bind {self.files.socket} ({exc}): another server has it; exiting", file=sys.stderr)
            return
        os.chmod(self.files.socket, 0o600)
        info = os.stat(self.files.socket)
        self.listener, self.inode = listener, (info.st_dev, info.st_ino)
        listener.listen(64)
        try:
            self._preload()
            Manifest.of_this_server(self.server_id, self.identity).write(self.files.manifest)
            self._loop()
        finally:
            self._stop_accepting()

    def _preload(self) -> None:
        before = dict(os.environ)
        _import_pytest_plugins()
        for name in self.preload:
            try:
                importlib.import_module(name)
            except Exception as exc:  # a missing optional library only costs its import later
                print(f"preload {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        # What an import put into the environment (torch: TORCHINDUCTOR_CACHE_DIR) a cold run has too.
        self.environment_added = {k: v for k, v in os.environ.items() if k not in before}
        # The imported libraries' objects live as long as the server: frozen, the children's
        # collections (pytest runs five at the end of a session) no longer walk them, and
        # their pages stay shared instead of being copied on the collector's writes.
        gc.freeze()

    def _loop(self) -> None:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector; reaped below
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, self._request_stop)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda fd: _drain(fd))
        self.wake_fds = (wake_r, wake_w)
        next_check = self.last_activity = time.monotonic()
        while self.listener is not None or self.runs:
            now = time.monotonic()
            if self.pending or self.runs:
                self.last_activity = now
            if self.listener is not None:
                if self.stop_requested:
                    self._stop_accepting("stopped by a signal")
                elif now - self.last_activity >= self.idle_s:
                    self._stop_accepting(f"idle for {self.idle_s:.0f} s")
                elif now >= next_check:
                    next_check = now + CHECK_PERIOD_S
                    if not self._socket_is_ours():
                        self._stop_accepting("its socket was removed or replaced")
            if self.listener is None and not self.runs:
                break  # stopped accepting just now, nothing in progress
            deadlines = [p.deadline for p in self.pending.values()]
            if self.listener is not None:  # once it stops accepting, only its runs' ends (SIGCHLD) and callers wake it
                deadlines += [next_check, self.last_activity + self.idle_s]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, _ in self.selector.select(timeout):
                try:
                    key.data(key.fileobj)
                except Exception:  # one connection's trouble: this server serves the others on
                    traceback.print_exc()
            self._reap()
            for conn in [c for c, p in self.pending.items() if p.deadline <= time.monotonic()]:
                self._drop(conn)  # a silent or slow client
        signal.set_wakeup_fd(-1)
        self.selector.close()

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _socket_is_ours(self) -> bool:
        try:
            info = os.stat(self.files.socket)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.inode

    def _stop_accepting(self, why: str | None = None) -> None:
        """Take the socket and manifest away (unless a newer server has them); runs in progress finish."""
        if self.listener is None:
            return
        if why:
            print(f"{why}: no new runs; exiting after {len(self.runs)} in progress", file=sys.stderr, flush=True)
        if self._socket_is_ours():
            with contextlib.suppress(OSError):
                self.files.socket.unlink()
        manifest = Manifest.read(self.files.manifest)
        if manifest is not None and manifest.server_id == self.server_id:
            with contextlib.suppress(OSError):
                self.files.manifest.unlink()
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        for conn in list(self.pending):
            self._drop(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: the others are served meanwhile
                print(f"accept: {exc}", file=sys.stderr, flush=True)
                return
            if self._admit(conn):
                conn.setblocking(False)
                self.pending[conn] = _Pending(time.monotonic() + HANDSHAKE_TIMEOUT_S)
                self.selector.register(conn, selectors.EVENT_READ, self._read_request)

    def _admit(self, conn: socket.socket) -> bool:
        if peer_uid(conn) == os.getuid():
            return True
        _send_quietly(conn, {"refused": f"this server serves uid {os.getuid()} only"})
        conn.close()
        return False

    def _drop(self, conn: socket.socket) -> None:
        pending = self.pending.pop(conn, None)
        if pending is not None:
            pending.close_fds()
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def _read_request(self, conn: socket.socket) -> None:
        pending = self.pending.get(conn)
        if pending is None:  # dropped since the selector reported it
            return
        try:
            data, fds, flags, _ = socket.recv_fds(conn, 65536, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        pending.fds += fds
        pending.data += data
        size = _LENGTH.unpack(pending.data[: _LENGTH.size])[0] if len(pending.data) >= _LENGTH.size else 0
        if not data or flags & socket.MSG_CTRUNC or size > _MAX_FRAME:
            self._drop(conn)  # gone, or not one of ours
            return
        if len(pending.data) < _LENGTH.size + size:
            return
        try:
            request = json.loads(pending.data[_LENGTH.size : _LENGTH.size + size])
        except ValueError:
            self._drop(conn)
            return
        fds, pending.fds = pending.fds, []
        self.pending.pop(conn)
        self.selector.unregister(conn)
        if _gone(conn):  # e.g. Ctrl-C while this server was busy: nothing to start for it
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        try:
            self._handle(conn, request, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _handle(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        self.last_activity = time.monotonic()
        op = request.get("op")
        if op == "run" and request.get("server") == self.server_id and len(fds) == 3 and request.get("entry") in ENTRIES:
            self._fork(conn, request, fds)
            return
        if op == "stop":
            self._stop_accepting("asked to stop")
            reply = {"stopped": os.getpid()}
        elif op == "ping":
            reply = {"ready": os.getpid(), "server": self.server_id}
        elif op == "run" and request.get("server") != self.server_id:
            reply = {"retry": "the warm server was replaced meanwhile"}
        elif op == "run" and len(fds) != 3:
            reply = {"refused": "a run needs the caller's stdin, stdout and stderr"}
        elif op == "run":
            reply = {"refused": f"unknown entry {request.get('entry')!r}"}
        else:
            reply = {"refused": f"unknown request {op!r}"}
        _send_quietly(conn, reply)
        conn.close()

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            _send_quietly(conn, {"refused": f"the warm server cannot fork: {exc}"})
            conn.close()
            return
        if pid == 0:
            try:
                self._close_in_child(keep=conn)
                _child(conn, request, fds, self.environment_added)
            finally:
                os._exit(70)
        with contextlib.suppress(OSError):  # the child does the same: whichever comes first
            os.setpgid(pid, pid)
        self.runs[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, self._watch_caller)

    def _close_in_child(self, keep: socket.socket) -> None:
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for fd in self.wake_fds:
            os.close(fd)
        for conn in [self.listener, *self.pending, *self.runs.values()]:
            if conn is not None and conn is not keep:
                conn.close()

    def _watch_caller(self, conn: socket.socket) -> None:
        """A running child's caller sends nothing more: end of stream means it is gone, so the run goes too."""
        try:
            if conn.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        pid = next((p for p, c in self.runs.items() if c is conn), None)
        self.selector.unregister(conn)
        conn.close()
        if pid is None:
            return
        self.runs[pid] = None
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.runs.pop(pid, None)
            if conn is None:
                continue
            self.selector.unregister(conn)
            code = os.waitstatus_to_exitcode(status)
            _send_quietly(conn, {"signal": -code} if code < 0 else {"exit": code})
            conn.close()


def _gone(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 4096):
            pass


def _send_quietly(conn: socket.socket, message: dict) -> bool:
    """Send to a client that may have gone (or stopped reading): never raises, never blocks."""
    try:
        conn.setblocking(False)
        conn.sendall(_frame(message))
        return True
    except OSError:
        return False


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
    tempfile.tempdir = None


# ---------------------------------------------------------------- the child


class WarmChild:
    """Registered as a plugin in a warm child's session: how ``--ml-warm`` there knows not to go warm
    again (an environment variable would reach the tests' own subprocesses)."""

    ml_warm_child = True


def is_child(config) -> bool:
    return any(getattr(plugin, "ml_warm_child", False) for plugin in config.pluginmanager.get_plugins())


class _CannotBecome(Exception):
    """A setting of the caller's that this child cannot take over."""


def _child(conn: socket.socket, request: dict, fds: list[int], environment_added: dict[str, str]) -> None:
    """In the forked child: become the caller's process, run the request's entry, exit as Python would."""
    server_main = sys.modules["__main__"]  # noqa: F841 (its globals are this code's: kept alive)
    try:
        _become(request["caller"], fds, environment_added)
    except _CannotBecome as exc:
        _send_quietly(conn, {"cold": str(exc)})
        os._exit(0)
    except Exception as exc:
        _send_quietly(conn, {"cold": f"the warm child could not become the caller: {type(exc).__name__}: {exc}"})
        os._exit(0)
    _send_quietly(conn, {"started": os.getpid()})
    conn.close()
    _exit_as_python(lambda: ENTRIES[request["entry"]](request))


def _become(caller: dict, fds: list[int], environment_added: dict[str, str]) -> None:
    os.setpgid(0, 0)
    try:
        for name, (soft, hard) in caller["rlimits"].items():
            limit = getattr(resource, name)
            if resource.getrlimit(limit) != (soft, hard):
                resource.setrlimit(limit, (soft, hard))
        if os.getpriority(os.PRIO_PROCESS, 0) != caller["nice"]:
            os.setpriority(os.PRIO_PROCESS, 0, caller["nice"])
        if caller["affinity"] is not None:
            os.sched_setaffinity(0, caller["affinity"])
    except (OSError, ValueError) as exc:
        raise _CannotBecome(f"cannot take over the caller's limits, nice value or CPUs: {exc}") from exc
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    _standard_streams(caller["unbuffered"])
    os.umask(caller["umask"])
    os.chdir(caller["cwd"])
    os.environ.clear()
    os.environ.update(caller["environ"])
    for name, value in environment_added.items():
        os.environ.setdefault(name, value)
    time.tzset()
    tempfile.tempdir = None  # computed again from this environment's TMPDIR on first use
    sys.path[:] = caller["path"]
    sys.argv[:] = caller["argv"]
    sys.orig_argv[:] = caller["orig_argv"]
    sys.warnoptions[:] = caller["warnoptions"]
    warnings.filters[:] = _filters_in(caller["filters"])
    warnings._filters_mutated()
    sys.modules["__main__"] = _main_module(caller["main"])
    _reseed()
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if signum in caller["ignored_signals"]:
            handler = signal.SIG_IGN
        elif signum == signal.SIGINT:
            handler = signal.default_int_handler
        else:
            handler = signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, caller["signal_mask"])


def _standard_streams(unbuffered: bool) -> None:
    """``sys.stdin``, ``sys.stdout`` and ``sys.stderr`` on fds 0-2 as the interpreter opens them at
    start (CPython's ``create_stdio``): line-buffered on a terminal (stderr always), or with ``-u``
    unbuffered and written through."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        old = getattr(sys, name)
        mode = "r" if fd == 0 else "w"
        binary = open(fd, mode + "b", 0 if unbuffered and mode == "w" else -1, closefd=False)
        raw = getattr(binary, "raw", binary)
        stream = io.TextIOWrapper(
            binary,
            encoding=old.encoding,
            errors=old.errors,
            newline="\n",
            line_buffering=not unbuffered and (raw.isatty() or fd == 2),
            write_through=unbuffered,
        )
        stream.mode = mode
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _reseed() -> None:
    """The global generators as a new process has them: seeded from the OS (fork copied the server's)."""
    import random

    random.seed()
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    if hasattr(sys.modules.get("torch"), "seed"):
        sys.modules["torch"].seed()  # CUDA's generators only when it is initialised: not here


def _main_module(main: dict) -> types.ModuleType:
    """A ``__main__`` as the interpreter makes it (``python -c``: no file, no spec, the builtin importer as loader)."""
    module = types.ModuleType("__main__")
    module.__annotations__, module.__builtins__ = {}, builtins
    module.__spec__ = importlib.util.find_spec(main["spec"]) if main["spec"] else None
    if module.__spec__ is not None:
        module.__loader__ = module.__spec__.loader
    elif main["file"] is not None:
        module.__loader__ = importlib.machinery.SourceFileLoader("__main__", main["file"])
    else:
        module.__loader__ = importlib.machinery.BuiltinImporter
    if main["file"] is not None:
        module.__file__ = main["file"]
    return module


def _filters_in(filters: list) -> list:
    """The caller's warning filters, with their categories and patterns resolved here."""
    resolved = []
    for action, message, module_name, qualname, module, lineno in filters:
        try:
            category = importlib.import_module(module_name)
            for part in qualname.split("."):
                category = getattr(category, part)
        except Exception:  # defined by a module a run imports itself: it adds its filter again
            continue
        resolved.append((action, _pattern_in(message), category, _pattern_in(module), lineno))
    return resolved


def _pattern_in(pattern: list | None):
    if pattern is None or pattern[0] == "text":  # the interpreter's own filters hold plain text
        return pattern and pattern[1]
    return re.compile(pattern[1], pattern[2])


def _filters_out() -> list:
    def pattern(p):
        return None if p is None else ["text", p] if isinstance(p, str) else ["re", p.pattern, p.flags]

    return [
        [action, pattern(message), category.__module__, category.__qualname__, pattern(module), lineno]
        for action, message, category, module, lineno in warnings.filters
    ]


def _run_pytest(request: dict) -> int:
    """What ``python -m pytest`` does (``pytest.console_main``), with the marker plugin."""
    import pytest

    try:
        code = pytest.main(request["args"], plugins=[WarmChild()])
        sys.stdout.flush()
        return int(code)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run_code(request: dict) -> int:
    """What ``python -c CODE`` does: CODE (``args[0]``) run in the fresh ``__main__``. An xdist
    worker: CODE is execnet's bootstrap, which reads the gateway from stdin and serves it."""
    main = sys.modules["__main__"]
    exec(compile(request["args"][0], "<string>", "exec"), main.__dict__)
    return 0


#: What a child may run: a pytest session, or an xdist worker's interpreter (see :func:`launch_worker`).
ENTRIES = {"pytest": _run_pytest, "python -c": _run_code}


def _exit_as_python(main) -> None:
    """Run ``main`` and end the process as the interpreter would at exit: the exit code (or the
    traceback), non-daemon threads joined, atexit callbacks, streams flushed, death by SIGINT for an
    uncaught KeyboardInterrupt. Never returns: this process must not unwind into the server's code."""
    code = 1
    interrupted = False
    try:
        code = main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:
        traceback.print_exc()
    with contextlib.suppress(BaseException):
        threading._shutdown()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


# ---------------------------------------------------------------- client


class Unavailable(Exception):
    """The warm server cannot take this run; the message says why, the run goes on cold."""


def cmdline_main(config, environment_defaults: dict[str, str] | None = None) -> int | None:
    """The plugin's ``pytest_cmdline_main``: ``--ml-warm-stop``, or ``--ml-warm``'s run (None: run here)."""
    if config.getoption("ml_warm_stop"):
        return stop()
    if not config.getoption("ml_warm") or is_child(config) or hasattr(config, "workerinput"):
        return None  # a warm child, an xdist worker: run here
    xdist = _xdist_options(config)
    if xdist:
        _fork_workers(config, xdist, environment_defaults)
        return None  # this process is the controller; its workers come from the server
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # fds 0-2 are the caller's own again
    code = run(_caller_state(config), [str(arg) for arg in config.invocation_params.args], environment_defaults)
    if code is not None and capture is not None:
        capture.read_global_capture()  # what the conftests printed here: the child printed it too
    return code


def _xdist_options(config) -> str | None:
    """The options (parsed, from the command line or the ini's addopts) that make this an xdist run."""
    option = config.option
    if getattr(option, "collectonly", False):
        return None  # xdist's own rule: collection alone runs in one process
    workers = getattr(option, "numprocesses", None)
    if workers in ("auto", "logical") and getattr(option, "usepdb", False):
        workers = 0  # xdist's own rule: -n auto with --pdb runs in one process
    if workers:
        return f"-n {workers}"
    if getattr(option, "tx", None) and getattr(option, "dist", "no") != "no":
        return "--tx"
    if getattr(option, "looponfail", False):
        return "--looponfail"
    return None


def _start_path(config) -> list[str]:
    """``sys.path`` as this interpreter started: what pytest's configuration has put in front of it
    (the ini's ``pythonpath``, then the conftests' directories) goes, since the child's pytest puts it
    there again."""
    path, inserted = list(sys.path), [str(p) for p in config.getini("pythonpath")]
    for start in range(len(path) - len(inserted) + 1):
        if inserted and path[start : start + len(inserted)] == inserted:
            return path[start + len(inserted) :]
    return path


def _umask() -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _caller_state(config) -> dict:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return {
        "argv": list(sys.argv),
        "orig_argv": list(sys.orig_argv),
        "cwd": str(config.invocation_params.dir),
        "path": _start_path(config),
        "main": {"file": getattr(main, "__file__", None), "spec": getattr(spec, "name", None)},
        "unbuffered": bool(getattr(sys.__stdout__, "write_through", False)),  # -u or PYTHONUNBUFFERED
        **_process_state(),
    }


def _process_state() -> dict:
    """What a process started from this one inherits, or takes from its environment at start."""
    return {
        "environ": dict(os.environ),
        "warnoptions": list(sys.warnoptions),
        "filters": _filters_out(),
        "umask": _umask(),
        "rlimits": {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "signal_mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "ignored_signals": sorted(s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN),
    }


def run(caller: dict, args: list[str], environment_defaults: dict[str, str] | None = None) -> int | None:
    """Run ``pytest args`` in a child of the warm server; its exit code, or None to run cold."""
    try:
        return _run(caller, args, environment_defaults)
    except KeyboardInterrupt:
        say("interrupted")
        return 2


def _check(manifest: Manifest, identity: Identity) -> None:
    """Whether this process's run can be forked from the server of ``manifest`` (Unavailable if not)."""
    if manifest.identity != identity.settings:
        raise Unavailable(f"the warm server cannot take this interpreter's settings ({identity.difference(manifest.identity)})")
    shadow = manifest.shadowed(list(sys.path))
    if shadow:
        raise Unavailable(shadow)


def _run(caller: dict, args: list[str], environment_defaults: dict[str, str] | None) -> int | None:
    identity = Identity.of_this_process(environment_defaults)
    try:
        files = ServerFiles(_private_dir(), identity.key)
        unreachable = None
        for _ in range(3):
            manifest = _current_server(files, identity, environment_defaults, unreachable)
            _check(manifest, identity)
            request = {"op": "run", "server": manifest.server_id, "entry": "pytest", "args": args, "caller": caller}
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            try:
                conn, reply = _request(files.socket, request, fds=[0, 1, 2], timeout=HANDSHAKE_TIMEOUT_S * 3)
            except (FileNotFoundError, ConnectionRefusedError):
                unreachable = manifest.server_id  # dead, or gone since: the next round starts one
                continue
            if "retry" not in reply:
                break
            conn.close()
        else:
            raise Unavailable("the warm server kept changing")
    except (Unavailable, OSError) as exc:
        say(f"{exc}; running cold")
        return None
    if "started" not in reply:
        conn.close()
        say(f"{reply.get('cold') or reply.get('refused') or reply}; running cold")
        return None
    return _follow(conn, reply["started"], set(caller["ignored_signals"]))


# ---------------------------------------------------------------- xdist workers


def _fork_workers(config, xdist: str, defaults: dict[str, str] | None) -> None:
    """An xdist run under ``--ml-warm``: make sure a current server runs for this caller (as a
    single warm run would), then have xdist start its local workers through :func:`launch_worker`
    (:class:`WarmWorkers`); otherwise one line says why and the workers start cold."""
    if xdist == "--looponfail":
        say("--looponfail: its workers cannot fork from the warm server; running cold")
        return
    if getattr(config.option, "numprocesses", None) is None and not any(map(_forkable, config.option.tx)):
        say(f"--tx {' '.join(config.option.tx)}: only local popen workers fork from the warm server; running cold")
        return
    identity = Identity.of_this_process(defaults)
    try:
        files = ServerFiles(_private_dir(), identity.key)
        unreachable = None
        for _ in range(3):
            manifest = _current_server(files, identity, defaults, unreachable)
            _check(manifest, identity)
            try:
                if _ping(files.socket).get("server") == manifest.server_id:
                    break
            except (FileNotFoundError, ConnectionRefusedError):
                unreachable = manifest.server_id  # dead: the next round starts one
        else:
            raise Unavailable("the warm server kept changing")
        plugin = WarmWorkers(files, defaults or {})
    except (Unavailable, OSError) as exc:
        say(f"{exc}; xdist workers start cold")
        return
    config.pluginmanager.register(plugin, "ml-warm-workers")


def _forkable(spec: str) -> bool:
    """A gateway spec (``[N*]popen...``) whose worker xdist starts here in a fresh ``python -u -c``."""
    from execnet import XSpec

    parsed = XSpec(spec.partition("*")[2] if spec.partition("*")[0].isdigit() else spec)
    return bool(parsed.popen) and not (parsed.python or parsed.via or parsed.dont_write_bytecode)


class WarmWorkers:
    """On an xdist controller under ``--ml-warm`` (registered as ``ml-warm-workers``): each local
    worker's gateway spec gets ``python=`` this file's launcher (``warm.py worker ...``, run by execnet
    in place of ``python``), which has the warm server fork the worker; restarted workers
    (``--max-worker-restart``) reuse the spec. A launcher that the server cannot serve starts a cold
    worker instead and notes why in a file of this run: this controller says each reason once."""

    def __init__(self, files: ServerFiles, defaults: dict[str, str]):
        self.notes = files.directory / f"workers-{os.getpid()}-{time.time_ns()}.cold"
        assignments = [f"{name}={value}" for name, value in defaults.items()]
        script = os.path.abspath(__file__)
        self.launcher = shlex.join([sys.executable, script, "worker", str(files.socket), str(self.notes), *assignments])
        self.said: set[str] = set()

    def pytest_configure(self, config) -> None:
        """After xdist's ``pytest_cmdline_main`` turned ``-n N`` into N ``popen`` specs, before its session reads them."""
        config.add_cleanup(lambda: self.notes.unlink(missing_ok=True))
        if "//" in self.launcher:  # a gateway spec cannot hold it
            say(f"the launcher's command line contains '//' ({self.launcher}); xdist workers start cold")
            return
        from xdist.workermanage import parse_tx_spec_config

        specs = parse_tx_spec_config(config)
        config.option.tx = [f"{spec}//python={self.launcher}" if _forkable(spec) else spec for spec in specs]

    def pytest_xdist_newgateway(self, gateway) -> None:
        """The launcher has forked (or exec'd a cold worker, having noted why) before the gateway answers."""
        try:
            reasons = self.notes.read_text().splitlines()
        except FileNotFoundError:
            return
        for reason in reasons:
            if reason not in self.said:
                self.said.add(reason)
                say(f"{reason}; xdist workers start cold")


def launch_worker(argv: list[str]) -> None:
    """``warm.py worker SOCKET NOTES [NAME=VALUE...] -u -c CODE``: execnet's ``python -u -c CODE``
    for an xdist worker (:class:`WarmWorkers`), forked from the warm server at SOCKET. Started in
    place of that interpreter, this process is what the worker would be (its streams, directory,
    environment, limits, signals), so it sends its own state; then it follows the worker as
    :func:`run`'s caller follows a run. A worker the server cannot take is exec'd here cold, the
    reason appended to NOTES. NAME=VALUE: the defaults of the controller's server identity."""
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    (socket_path, notes, *assignments), python_args = argv[:split], argv[split:]
    try:
        conn, child = _start_worker(Path(socket_path), dict(a.split("=", 1) for a in assignments), python_args)
    except Exception as exc:  # whatever it is, the worker starts
        reason = str(exc) if isinstance(exc, Unavailable) else f"the warm worker launcher failed: {type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            descriptor = os.open(notes, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(descriptor, f"{reason}\n".encode())
            os.close(descriptor)
        os.execv(sys.executable, [sys.executable, *python_args])
    # The worker has execnet's pipes now: when it ends, they close, whatever this process does.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    ignored = {s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN}
    os._exit(_follow(conn, child, ignored))


def _start_worker(path: Path, defaults: dict[str, str], python_args: list[str]) -> tuple[socket.socket, int]:
    """Have the server at ``path`` fork ``python <python_args>``: the connection and the child's pid."""
    unbuffered = python_args[:1] == ["-u"]
    code_args = python_args[1:] if unbuffered else python_args
    if len(code_args) != 2 or code_args[0] != "-c":
        raise Unavailable(f"execnet asked for interpreter options the launcher does not take: {python_args[:-1]}")
    manifest = Manifest.read(ServerFiles.from_socket(path).manifest)
    if manifest is None:
        raise Unavailable(f"no warm server at {path}")
    changed = manifest.changed()
    if changed:
        raise Unavailable(f"the warm server is out of date: {changed}")
    identity = Identity.of_this_process(defaults)
    if manifest.identity != identity.settings:
        raise Unavailable(f"the warm server cannot take the workers' settings ({identity.difference(manifest.identity)})")
    state = {
        "argv": ["-c"],
        "orig_argv": [sys.executable, *python_args],
        "cwd": os.getcwd(),
        # python -c puts '' where a script's directory (this file's) goes.
        "path": list(sys.path) if sys.flags.safe_path else ["", *sys.path[1:]],
        "main": {"file": None, "spec": None},
        "unbuffered": unbuffered or bool(getattr(sys.__stdout__, "write_through", False)),
        **_process_state(),
    }
    request = {"op": "run", "server": manifest.server_id, "entry": "python -c", "args": code_args[1:], "caller": state}
    try:
        conn, reply = _request(path, request, fds=[0, 1, 2], timeout=HANDSHAKE_TIMEOUT_S * 3)
    except OSError as exc:
        raise Unavailable(f"cannot reach the warm server: {exc}") from exc
    if "started" not in reply:
        conn.close()
        raise Unavailable(reply.get("cold") or reply.get("refused") or reply.get("retry") or str(reply))
    return conn, reply["started"]


def _connect(path: Path, timeout: float | None) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except BaseException:
        conn.close()
        raise
    return conn


def _request(path: Path, message: dict, fds: list[int] | None = None, timeout: float | None = STARTUP_TIMEOUT_S):
    conn = _connect(path, timeout)
    try:
        _send(conn, message, fds)
        reply = _receive(conn)
    except BaseException:
        conn.close()
        raise
    if reply is None:
        conn.close()
        raise Unavailable("the warm server closed the connection")
    return conn, reply


def _ping(path: Path) -> dict:
    conn, reply = _request(path, {"op": "ping"})
    conn.close()
    return reply


def _current_server(
    files: ServerFiles, identity: Identity, defaults: dict[str, str] | None, unreachable: str | None = None
) -> Manifest:
    """The manifest of a current server for ``files``: the running one, or one started now (in place
    of one whose files changed, or that did not answer as ``unreachable``), under a lock that makes
    concurrent callers start one."""
    manifest = Manifest.read(files.manifest)
    changed = manifest.changed() if manifest is not None else None
    if manifest is not None and changed is None and manifest.server_id != unreachable:
        return manifest
    with _start_lock(files):
        current = Manifest.read(files.manifest)
        if current is not None and manifest is not None and current.server_id != manifest.server_id:
            return current  # another caller replaced it meanwhile
        if current is not None and changed is not None:
            say(f"restarting the warm server: {changed}")
            with contextlib.suppress(OSError, Unavailable):
                _request(files.socket, {"op": "stop"}, timeout=10)[0].close()
        else:
            try:
                _ping(files.socket)
                current = Manifest.read(files.manifest)
                if current is not None:
                    return current
            except (FileNotFoundError, ConnectionRefusedError):
                if files.socket.exists():
                    say("removed the socket of a warm server that is gone")
            except (OSError, Unavailable) as exc:
                raise Unavailable(f"cannot reach the warm server: {exc}") from exc
        for path in (files.socket, files.manifest):
            path.unlink(missing_ok=True)
        process = start_server(files.socket, identity.server_environment(defaults))
        say(f"starting a warm server (pid {process.pid}); this run waits for its imports")
        return _wait_ready(files, process)


@contextlib.contextmanager
def _start_lock(files: ServerFiles):
    from filelock import FileLock, Timeout

    lock = FileLock(files.lock)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say("waiting for the warm server that another run is starting")
        try:
            lock.acquire(timeout=STARTUP_TIMEOUT_S)
        except Timeout as exc:
            raise Unavailable(f"{files.lock} stayed locked for {STARTUP_TIMEOUT_S} s") from exc
    try:
        yield
    finally:
        lock.release()


def start_server(path: Path, environ: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server for ``path`` in a session of its own; its output goes to a log beside the socket."""
    files = ServerFiles.from_socket(path)
    with open(files.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, *_interpreter_args(), os.path.abspath(__file__), "serve", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environ if environ is not None else Identity.server_environment(None),
            cwd=files.directory,
            start_new_session=True,
            close_fds=True,
        )


def _wait_ready(files: ServerFiles, process: subprocess.Popen) -> Manifest:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:  # it binds and listens before its imports: until it listens, a connection is refused
        if process.poll() is not None or time.monotonic() > deadline:
            raise Unavailable(f"the warm server did not start (see {files.log})")
        try:
            _ping(files.socket)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)
        except (OSError, Unavailable) as exc:
            raise Unavailable(f"the warm server did not start: {exc} (see {files.log})") from exc
    manifest = Manifest.read(files.manifest)
    if manifest is None:
        raise Unavailable(f"the warm server wrote no manifest (see {files.log})")
    return manifest


def _follow(conn: socket.socket, child: int, ignored: set[int]) -> int:
    """Wait for the child's end, passing signals on; exit as it did, or die by the signal it died by."""

    def to_group(signum, frame):
        with contextlib.suppress(OSError):
            os.killpg(child, signum)

    def to_child(signum, frame):
        with contextlib.suppress(OSError):
            os.kill(child, signum)

    def stop_too(signum, frame):  # Ctrl-Z: the child stops, then this process as it would have
        to_group(signum, frame)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, stop_too)

    handlers = {getattr(signal, name): to_group for name in TERMINAL_SIGNALS}
    handlers |= {getattr(signal, name): to_child for name in PROCESS_SIGNALS}
    handlers[signal.SIGTSTP] = stop_too
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items() if sig not in ignored}
    try:
        conn.settimeout(None)
        reply = _receive(conn)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        conn.close()
    if reply is None:
        with contextlib.suppress(OSError):
            os.killpg(child, signal.SIGKILL)
        say("the warm server went away during the run (see its log); the run was stopped")
        return 1
    if "signal" in reply:
        _die_by(reply["signal"])
    return reply["exit"]


def _die_by(signum: int) -> None:
    """End this process by ``signum``, as the child ended: the shell sees the same status."""
    import faulthandler

    faulthandler.disable()  # its traceback would be this process's, not the child's
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # a signal whose default is to be ignored or to stop


def stop() -> int:
    """Stop this user's servers of this interpreter (every identity's), if any run; exit code 0 either way.

    Another interpreter's (another virtualenv, another checkout's) are left running: this pytest could
    not have used them. A server without a manifest yet (still importing) is stopped.
    """
    try:
        sockets = sorted(_private_dir().glob("server-*.sock"))
    except OSError as exc:
        say(f"no warm server answered: {exc}")
        return 0
    stopped, others = 0, []
    for path in sockets:
        manifest = Manifest.read(ServerFiles.from_socket(path).manifest)
        if manifest is not None and manifest.identity.get("executable") != sys.executable:
            others.append(f"pid {manifest.pid}, {manifest.identity.get('executable')}")
            continue
        try:
            conn, reply = _request(path, {"op": "stop"}, timeout=10)
            conn.close()
        except (FileNotFoundError, ConnectionRefusedError):
            path.unlink(missing_ok=True)  # a dead server's socket
            ServerFiles.from_socket(path).manifest.unlink(missing_ok=True)
            continue
        except (Unavailable, OSError) as exc:
            say(f"the warm server at {path} did not answer: {exc}")
            continue
        stopped += 1
        say(f"stopped the warm server (pid {reply.get('stopped')})")
    if not stopped:
        say("no warm server is running" + (" for this interpreter" if others else ""))
    if others:
        say(f"left the warm servers of other interpreters running: {'; '.join(others)}")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    launch_worker(sys.argv[2:])
elif __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    # Run as a script: sys.path[0] is this directory; drop it, so that nothing of the repository is importable.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    preload = os.environ.get("ML_WARM_PRELOAD")
    Server(
        Path(sys.argv[2]),
        idle_s=float(os.environ.get("ML_WARM_IDLE_S", "1800")),
        preload=[m for m in preload.split(",") if m] if preload is not None else list(PRELOAD),
    ).serve()
