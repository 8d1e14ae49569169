"""The warm server: run in its own process, started by a caller (``lifecycle.py``) as
``python .../warm/core serve SOCKET``.

It binds its socket, imports what the project's models need (``$ML_WARM_PRELOAD``: torch,
transformers, FlagEmbedding, ...) and pytest with its plugins, writes its manifest, then serves.
For each run it forks a child (``child.py``) that becomes the caller's process; it reaps the child
and sends its wait status back, as CPython's ``multiprocessing/forkserver.py`` does. Each child has
a slot on the server's board of runs (``cores.py``), from which it takes its share of the CPUs. It never runs
a torch op nor touches CUDA: a process forked after OpenMP has started deadlocks in its first op,
one forked after imports only runs models fine.

One thread around a selector: a client that sends nothing, or vanishes at any point, delays and
harms no other. It stops accepting when its socket file is removed or replaced, after
``$ML_WARM_IDLE_S`` seconds without a request (default 1800), on SIGTERM, SIGHUP or SIGINT, or when
asked (``--ml-warm-stop``); runs in progress finish first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import child, cores, protocol
from .identity import Identity, Manifest

#: What a server imports when ``ML_WARM_PRELOAD`` does not say (the plugin sets it from the
#: project's declaration: its ``warm_preload`` and each model's ``preload``).
PRELOAD = ("torch", "transformers")
#: How often the server looks whether its socket file is still its own.
CHECK_PERIOD_S = 1.0


@dataclasses.dataclass
class _Pending:
    """A connection whose request has not arrived whole yet."""

    deadline: float
    data: bytes = b""
    fds: list[int] = dataclasses.field(default_factory=list)

    def request(self) -> dict | None:
        """The request once it has arrived whole; None before."""
        size = self.size()
        if len(self.data) < protocol.LENGTH.size or len(self.data) < protocol.LENGTH.size + size:
            return None
        return json.loads(self.data[protocol.LENGTH.size : protocol.LENGTH.size + size])

    def size(self) -> int:
        """The announced length of the request (0 until its length has arrived)."""
        return protocol.LENGTH.unpack(self.data[: protocol.LENGTH.size])[0] if len(self.data) >= protocol.LENGTH.size else 0


class Server:
    """One identity's server on the socket ``path``."""

    def __init__(self, path: Path, idle_s: float, preload: list[str]):
        self.files = protocol.ServerFiles.from_socket(path)
        self.idle_s, self.preload = idle_s, preload
        self.identity = Identity.of_this_process()
        self.server_id = f"{os.getpid()}-{time.time_ns()}"
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.inode: tuple[int, int] | None = None
        self.pending: dict[socket.socket, _Pending] = {}
        #: Each child's pid -> its caller's connection (None once the caller has gone).
        self.runs: dict[int, socket.socket | None] = {}
        self.environment_added: dict[str, str] = {}
        self.stop_requested = False
        self.last_activity = time.monotonic()
        self.next_check = self.last_activity
        self.wake_fds: tuple[int, ...] = ()

    # ------------------------------------------------------------ start and stop

    def serve(self) -> None:
        """Bind, import, write the manifest, serve until stopped with nothing in progress."""
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
        cores.BOARD = cores.Board()  # before any fork: every child shares its pages
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

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        self._wake_on_signals()
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        while self._still_serving():
            for key, _ in self.selector.select(self._timeout()):
                try:
                    key.data(key.fileobj)
                except Exception:  # one connection's trouble: this server serves the others on
                    traceback.print_exc()
            self._reap()
            self._drop_late_requests()
        signal.set_wakeup_fd(-1)
        self.selector.close()

    def _wake_on_signals(self) -> None:
        """Signals wake the selector through a pipe: SIGCHLD (a run ended: reaped after the select),
        and the stop signals."""
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, self._request_stop)
        self.selector.register(wake_r, selectors.EVENT_READ, _drain)
        self.wake_fds = (wake_r, wake_w)

    def _still_serving(self) -> bool:
        """Stop accepting when a reason has come up; go on while accepting or runs are in progress."""
        now = time.monotonic()
        if self.pending or self.runs:
            self.last_activity = now
        if self.listener is not None:
            if self.stop_requested:
                self._stop_accepting("stopped by a signal")
            elif now - self.last_activity >= self.idle_s:
                self._stop_accepting(f"idle for {self.idle_s:.0f} s")
            elif now >= self.next_check:
                self.next_check = now + CHECK_PERIOD_S
                if not self._socket_is_ours():
                    self._stop_accepting("its socket was removed or replaced")
        return self.listener is not None or bool(self.runs)

    def _timeout(self) -> float | None:
        """Until the next deadline; once it stops accepting, only its runs' ends (SIGCHLD) and callers wake it."""
        deadlines = [p.deadline for p in self.pending.values()]
        if self.listener is not None:
            deadlines += [self.next_check, self.last_activity + self.idle_s]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _drop_late_requests(self) -> None:
        for conn in [c for c, p in self.pending.items() if p.deadline <= time.monotonic()]:
            self._drop(conn)  # a silent or slow client

    # ------------------------------------------------------------ requests

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
                self.pending[conn] = _Pending(time.monotonic() + protocol.HANDSHAKE_TIMEOUT_S)
                self.selector.register(conn, selectors.EVENT_READ, self._read_request)

    def _admit(self, conn: socket.socket) -> bool:
        if protocol.peer_uid(conn) == os.getuid():
            return True
        protocol.send_quietly(conn, {"refused": f"this server serves uid {os.getuid()} only"})
        conn.close()
        return False

    def _drop(self, conn: socket.socket) -> None:
        pending = self.pending.pop(conn, None)
        if pending is not None:
            protocol.close_all(pending.fds)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def _read_request(self, conn: socket.socket) -> None:
        """Read what has arrived; once the request is whole, handle it."""
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
        if not data or flags & socket.MSG_CTRUNC or pending.size() > protocol.MAX_FRAME:
            self._drop(conn)  # gone, or not one of ours
            return
        try:
            request = pending.request()
        except ValueError:
            self._drop(conn)
            return
        if request is None:
            return
        fds, pending.fds = pending.fds, []
        self.pending.pop(conn)
        self.selector.unregister(conn)
        try:
            if protocol.gone(conn):  # e.g. Ctrl-C while this server was busy: nothing to start for it
                conn.close()
            else:
                self._handle(conn, request, fds)
        finally:
            protocol.close_all(fds)

    def _handle(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        self.last_activity = time.monotonic()
        op = request.get("op")
        if op == "run":
            refused = self._refusal(request, fds)
            if refused is None:
                self._fork(conn, request, fds)
                return
            reply = refused
        elif op == "stop":
            self._stop_accepting("asked to stop")
            reply = {"stopped": os.getpid()}
        elif op == "ping":
            reply = {"ready": os.getpid(), "server": self.server_id}
        else:
            reply = {"refused": f"unknown request {op!r}"}
        protocol.send_quietly(conn, reply)
        conn.close()

    def _refusal(self, request: dict, fds: list[int]) -> dict | None:
        """Why a run request cannot be served, as the reply; None if it can."""
        if request.get("server") != self.server_id:
            return {"retry": "the warm server was replaced meanwhile"}
        if len(fds) != 3:
            return {"refused": "a run needs the caller's stdin, stdout and stderr"}
        if request.get("entry") not in child.ENTRIES:
            return {"refused": f"unknown entry {request.get('entry')!r}"}
        return None

    # ------------------------------------------------------------ runs

    def _fork(self, conn: socket.socket, request: dict, fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        slot = cores.BOARD.free_slot()
        if slot is not None:
            cores.BOARD.hold(slot, -1)  # taken from now on; the pid once known
        try:
            pid = os.fork()
        except OSError as exc:
            if slot is not None:
                cores.BOARD.release(-1)
            protocol.send_quietly(conn, {"refused": f"the warm server cannot fork: {exc}"})
            conn.close()
            return
        if pid == 0:
            try:
                cores.SLOT = slot
                self._close_in_child(keep=conn)
                child.run(conn, request, fds, self.environment_added)
            finally:
                os._exit(70)
        if slot is not None:
            cores.BOARD.hold(slot, pid)
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
        """Collect every child that ended and send its wait status to its caller."""
        while self.runs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            cores.BOARD.release(pid)
            conn = self.runs.pop(pid, None)
            if conn is None:
                continue
            self.selector.unregister(conn)
            code = os.waitstatus_to_exitcode(status)
            protocol.send_quietly(conn, {"signal": -code} if code < 0 else {"exit": code})
            conn.close()


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 4096):
            pass


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


def main(socket_path: str) -> None:
    """``serve SOCKET``: this process becomes the server of ``SOCKET`` until it stops."""
    preload = os.environ.get("ML_WARM_PRELOAD")
    Server(
        Path(socket_path),
        idle_s=float(os.environ.get("ML_WARM_IDLE_S", "1800")),
        preload=[m for m in preload.split(",") if m] if preload is not None else list(PRELOAD),
    ).serve()
