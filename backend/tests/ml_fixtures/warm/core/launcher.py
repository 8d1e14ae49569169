"""An xdist worker forked from the warm server: run in the launcher process that execnet starts in
place of ``python -u -c <bootstrap>`` (``python .../warm/core worker SOCKET NOTES [NAME=VALUE...] -u -c CODE``).

Started in place of that interpreter, the launcher is what the worker would be (its streams,
directory, environment, limits, signals), so it sends its own state, has the server fork a child
that becomes that interpreter and runs the bootstrap, then follows the child as a warm run's caller
follows its run. A worker the server cannot take is exec'd here cold, the reason appended to NOTES,
which the controller (``ml_fixtures.warm.workers``) reads and says once. NAME=VALUE: the
:class:`~.identity.EnvironmentDefaults` of the controller's server identity.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from . import caller, protocol
from .identity import EnvironmentDefaults, Identity, Manifest


def main(argv: list[str]) -> None:
    """``worker SOCKET NOTES [NAME=VALUE...] PYTHON-ARGS``: become the worker's interpreter, warm or cold."""
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    (socket_path, notes, *assignments), python_args = argv[:split], argv[split:]
    try:
        conn, child = _start_worker(Path(socket_path), EnvironmentDefaults.from_arguments(assignments), python_args)
    except Exception as exc:  # whatever it is, the worker starts
        reason = str(exc)
        if not isinstance(exc, protocol.CannotRunWarm):
            reason = f"the warm worker launcher failed: {type(exc).__name__}: {exc}"
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
    os._exit(caller.follow(conn, child, ignored))


def _start_worker(path: Path, env_defaults: EnvironmentDefaults, python_args: list[str]) -> tuple[socket.socket, int]:
    """Have the server at ``path`` fork ``python <python_args>``: the connection and the child's pid."""
    unbuffered = python_args[:1] == ["-u"]
    code_args = python_args[1:] if unbuffered else python_args
    if len(code_args) != 2 or code_args[0] != "-c":
        raise protocol.CannotRunWarm(f"execnet asked for interpreter options the launcher does not take: {python_args[:-1]}")
    manifest = Manifest.read(protocol.ServerFiles.from_socket(path).manifest)
    if manifest is None:
        raise protocol.CannotRunWarm(f"no warm server at {path}")
    changed = manifest.changed()
    if changed:
        raise protocol.CannotRunWarm(f"the warm server is out of date: {changed}")
    manifest.check(Identity.of_this_process(env_defaults), whose="the workers'")
    state = {
        "argv": ["-c"],
        "orig_argv": [sys.executable, *python_args],
        "cwd": os.getcwd(),
        # python -c puts '' first (the bootstrap has taken the launcher's own directory out).
        "path": list(sys.path) if sys.flags.safe_path else ["", *sys.path],
        "main": {"file": None, "spec": None},
        "unbuffered": unbuffered or bool(getattr(sys.__stdout__, "write_through", False)),
        **caller.process_state(),
    }
    request = {"op": "run", "server": manifest.server_id, "entry": "python -c", "args": code_args[1:], "caller": state}
    try:
        conn, reply = protocol.request(path, request, fds=[0, 1, 2], timeout=protocol.HANDSHAKE_TIMEOUT_S * 3)
    except OSError as exc:
        raise protocol.CannotRunWarm(f"cannot reach the warm server: {exc}") from exc
    if "started" not in reply:
        conn.close()
        raise protocol.CannotRunWarm(protocol.refusal(reply))
    return conn, reply["started"]
