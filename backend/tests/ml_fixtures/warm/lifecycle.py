"""A current warm server for this caller: run in the caller's pytest (a warm run, an xdist
controller under ``--ml-warm -n N``, ``--ml-warm-stop``).

A server is current when its manifest's files are unchanged since it imported them; one that is
not is stopped and replaced, and concurrent first runs start one server (a file lock beside the
socket). The server's output goes to a log beside its socket.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from _ml_fixtures_warm_core import protocol
from _ml_fixtures_warm_core.identity import EnvironmentDefaults, Identity, Manifest, interpreter_args
from _ml_fixtures_warm_core.protocol import CannotRunWarm, ServerFiles, say
from ml_fixtures.warm import CORE_DIR

T = TypeVar("T")


def with_current_server(
    identity: Identity,
    env_defaults: EnvironmentDefaults,
    caller_path: list[str] | None,
    attempt: Callable[[ServerFiles, Manifest], T | None],
) -> T:
    """``attempt(files, manifest)`` on a current server that can take this caller (started if need
    be), again on a new one while ``attempt`` finds it gone (returns None), three times at most.

    Raises :class:`CannotRunWarm` (or ``OSError``) when no server can take the run.
    """
    files = ServerFiles(protocol.private_dir(), identity.key)
    unreachable = None
    for _ in range(3):
        manifest = current_server(files, identity, env_defaults, unreachable)
        manifest.check(identity, caller_path)
        result = attempt(files, manifest)
        if result is not None:
            return result
        unreachable = manifest.server_id  # dead, or gone since: the next round starts one
    raise CannotRunWarm("the warm server kept changing")


def current_server(
    files: ServerFiles, identity: Identity, env_defaults: EnvironmentDefaults, unreachable: str | None = None
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
            with contextlib.suppress(OSError, CannotRunWarm):
                protocol.request(files.socket, {"op": "stop"}, timeout=10)[0].close()
        else:
            running = _running(files)
            if running is not None:
                return running
        for path in (files.socket, files.manifest):
            path.unlink(missing_ok=True)
        process = start_server(files.socket, Identity.server_environment(env_defaults))
        say(f"starting a warm server (pid {process.pid}); this run waits for its imports")
        return _wait_ready(files, process)


def _running(files: ServerFiles) -> Manifest | None:
    """The manifest of a server that answers at ``files.socket`` now, if one does."""
    try:
        protocol.ping(files.socket)
        return Manifest.read(files.manifest)
    except (FileNotFoundError, ConnectionRefusedError):
        if files.socket.exists():
            say("removed the socket of a warm server that is gone")
        return None
    except (OSError, CannotRunWarm) as exc:
        raise CannotRunWarm(f"cannot reach the warm server: {exc}") from exc


@contextlib.contextmanager
def _start_lock(files: ServerFiles):
    from filelock import FileLock, Timeout

    lock = FileLock(files.lock)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say("waiting for the warm server that another run is starting")
        try:
            lock.acquire(timeout=protocol.STARTUP_TIMEOUT_S)
        except Timeout as exc:
            raise CannotRunWarm(f"{files.lock} stayed locked for {protocol.STARTUP_TIMEOUT_S} s") from exc
    try:
        yield
    finally:
        lock.release()


def start_server(path: Path, environ: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server for ``path`` in a session of its own; its output goes to a log beside the socket."""
    files = ServerFiles.from_socket(path)
    with open(files.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, *interpreter_args(), str(CORE_DIR), "serve", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=environ if environ is not None else Identity.server_environment(EnvironmentDefaults()),
            cwd=files.directory,
            start_new_session=True,
            close_fds=True,
        )


def _wait_ready(files: ServerFiles, process: subprocess.Popen) -> Manifest:
    deadline = time.monotonic() + protocol.STARTUP_TIMEOUT_S
    while True:  # it binds and listens before its imports: until it listens, a connection is refused
        if process.poll() is not None or time.monotonic() > deadline:
            raise CannotRunWarm(f"the warm server did not start (see {files.log})")
        try:
            protocol.ping(files.socket)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.01)
        except (OSError, CannotRunWarm) as exc:
            raise CannotRunWarm(f"the warm server did not start: {exc} (see {files.log})") from exc
    manifest = Manifest.read(files.manifest)
    if manifest is None:
        raise CannotRunWarm(f"the warm server wrote no manifest (see {files.log})")
    return manifest


def stop() -> int:
    """Stop this user's servers of this interpreter (every identity's), if any run; exit code 0 either way.

    Another interpreter's (another virtualenv, another checkout's) are left running: this pytest could
    not have used them. A server without a manifest yet (still importing) is stopped.
    """
    try:
        sockets = sorted(protocol.private_dir().glob("server-*.sock"))
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
            conn, reply = protocol.request(path, {"op": "stop"}, timeout=10)
            conn.close()
        except (FileNotFoundError, ConnectionRefusedError):
            path.unlink(missing_ok=True)  # a dead server's socket
            ServerFiles.from_socket(path).manifest.unlink(missing_ok=True)
            continue
        except (CannotRunWarm, OSError) as exc:
            say(f"the warm server at {path} did not answer: {exc}")
            continue
        stopped += 1
        say(f"stopped the warm server (pid {reply.get('stopped')})")
    if not stopped:
        say("no warm server is running" + (" for this interpreter" if others else ""))
    if others:
        say(f"left the warm servers of other interpreters running: {'; '.join(others)}")
    return 0
