"""Where a warm server lives and how its peers talk to it: run in the caller, the server and the launcher.

One server per identity (``identity.py``) has four files in a directory only the user can enter:
its socket, its manifest, the lock under which it is started, its log. A message is one JSON
object behind its length (4 bytes, network order); a run's request carries the caller's standard
streams as file descriptors (SCM_RIGHTS). The server serves its own uid only (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import struct
import sys
from pathlib import Path

STARTUP_TIMEOUT_S = 180
HANDSHAKE_TIMEOUT_S = 10
LENGTH = struct.Struct("!I")
MAX_FRAME = 16 << 20


class CannotRunWarm(Exception):
    """The warm server cannot take this run (or worker); the message says why, and it goes on cold."""


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


def private_dir() -> Path:
    """:func:`socket_dir`, created 0700; refused if another user owns it."""
    directory = socket_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory


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


def frame(message: dict) -> bytes:
    data = json.dumps(message).encode()
    return LENGTH.pack(len(data)) + data


def send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = frame(message)
    sent = socket.send_fds(conn, [data], fds) if fds else 0
    conn.sendall(data[sent:])


def receive(conn: socket.socket) -> dict | None:
    """One message; None when the peer has gone."""
    data = b""
    while len(data) < LENGTH.size or len(data) < LENGTH.size + LENGTH.unpack(data[: LENGTH.size])[0]:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    return json.loads(data[LENGTH.size : LENGTH.size + LENGTH.unpack(data[: LENGTH.size])[0]])


def send_quietly(conn: socket.socket, message: dict) -> bool:
    """Send to a peer that may have gone (or stopped reading): never raises, never blocks."""
    try:
        conn.setblocking(False)
        conn.sendall(frame(message))
        return True
    except OSError:
        return False


def gone(conn: socket.socket) -> bool:
    """Whether the peer has closed its end (nothing is read)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def peer_uid(conn: socket.socket) -> int:
    """The connecting process's uid, from the kernel (SO_PEERCRED: pid, uid, gid)."""
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[1]


def connect(path: Path, timeout: float | None) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except BaseException:
        conn.close()
        raise
    return conn


def request(path: Path, message: dict, fds: list[int] | None = None, timeout: float | None = STARTUP_TIMEOUT_S):
    """Send ``message`` to the server at ``path``: the open connection and the reply."""
    conn = connect(path, timeout)
    try:
        send(conn, message, fds)
        reply = receive(conn)
    except BaseException:
        conn.close()
        raise
    if reply is None:
        conn.close()
        raise CannotRunWarm("the warm server closed the connection")
    return conn, reply


def ping(path: Path) -> dict:
    conn, reply = request(path, {"op": "ping"})
    conn.close()
    return reply


def refusal(reply: dict) -> str:
    """Why the server did not start a run, from its reply."""
    return reply.get("cold") or reply.get("refused") or reply.get("retry") or str(reply)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
