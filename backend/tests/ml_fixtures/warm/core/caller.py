"""The caller's side of a warm run: run in the caller's pytest and in the worker launcher.

What a process started from this one would inherit (:func:`process_state`, sent with the run's
request), and, while the child runs, passing the terminal's and the other signals on and ending as
the child ended: its exit code, or death by the same signal (:func:`follow`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sys
import warnings

from . import protocol

#: Signals the caller passes on while its run goes: the terminal's to the child's process group
#: (as the terminal sends them to a cold run's), the others to the child alone.
TERMINAL_SIGNALS = ("SIGINT", "SIGQUIT", "SIGTSTP", "SIGCONT", "SIGWINCH")
PROCESS_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM")


def process_state() -> dict:
    """What a process started from this one inherits, or takes from its environment at start."""
    return {
        "environ": dict(os.environ),
        "warnoptions": list(sys.warnoptions),
        "filters": filters_out(),
        "umask": _umask(),
        "rlimits": {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "signal_mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "ignored_signals": ignored_signals(),
    }


def ignored_signals() -> list[int]:
    return sorted(s for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN)


def filters_out() -> list:
    """This process's warning filters as JSON (the child resolves them again: ``child._filters_in``)."""

    def pattern(p):
        return None if p is None else ["text", p] if isinstance(p, str) else ["re", p.pattern, p.flags]

    return [
        [action, pattern(message), category.__module__, category.__qualname__, pattern(module), lineno]
        for action, message, category, module, lineno in warnings.filters
    ]


def _umask() -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Forwarding:
    """While a child runs: the terminal's signals to its process group, the others to it alone;
    Ctrl-Z stops the child, then this process, as it would have. ``handlers`` replace some."""

    def __init__(self, child: int, ignored: set[int], handlers: dict | None = None):
        self.child, self.ignored = child, ignored
        self.handlers = {getattr(signal, name): self.to_group for name in TERMINAL_SIGNALS}
        self.handlers |= {getattr(signal, name): self.to_child for name in PROCESS_SIGNALS}
        self.handlers[signal.SIGTSTP] = self.stop_too
        self.handlers |= handlers or {}
        self.previous: dict = {}

    def to_group(self, signum, frame) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.child, signum)

    def to_child(self, signum, frame) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.child, signum)

    def stop_too(self, signum, frame) -> None:
        self.to_group(signum, frame)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, self.stop_too)

    def __enter__(self) -> Forwarding:
        self.previous = {sig: signal.signal(sig, h) for sig, h in self.handlers.items() if sig not in self.ignored}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def status(reply: dict | None) -> int | None:
    """The child's wait status from the server's last message: its exit code, or minus the signal
    that ended it; None when the server went away."""
    if reply is None:
        return None
    return -reply["signal"] if "signal" in reply else reply["exit"]


def gone_server(child: int) -> int:
    """The server went away during the run: stop what is left of it."""
    with contextlib.suppress(OSError):
        os.killpg(child, signal.SIGKILL)
    protocol.say("the warm server went away during the run (see its log); the run was stopped")
    return 1


def follow(conn: socket.socket, child: int, ignored: set[int]) -> int:
    """Wait for the child's end, passing signals on; exit as it did, or die by the signal it died by."""
    try:
        with Forwarding(child, ignored):
            conn.settimeout(None)
            ended = status(protocol.receive(conn))
    finally:
        conn.close()
    if ended is None:
        return gone_server(child)
    if ended < 0:
        die_by(-ended)
    return ended


def die_by(signum: int) -> None:
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
