"""``pytest --ml-watch [args]``: on each save, the tests it affects in a warm child. Run in the
pytest process the user started, which imports no torch and stays until Ctrl-C.

A watcher thread (watchfiles, on the repository's directories but its virtualenvs and caches) hands
each batch of saves to the loop — an editor that writes several files at once makes one batch. The
loop runs each cycle as ``pytest --ml-affected args`` through the warm server, as ``--ml-warm``
runs one session; a batch that comes while a cycle runs cancels it (its process group is killed)
and starts the next. Each cycle ends with pytest's own summary line. Ctrl-C ends the loop (a
cycle in progress is interrupted, as Ctrl-C interrupts pytest) with the exit code of the last cycle
that finished.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import watchfiles

from _ml_fixtures_warm_core import caller, protocol
from _ml_fixtures_warm_core.identity import EnvironmentDefaults
from ml_fixtures.affected.recorder import IGNORED_DIRECTORIES
from ml_fixtures.warm import client

#: How long the watcher waits, after a change, for more before it hands the batch over (ms).
QUIET_MS = 100
IGNORED_FILES = (r"\.sqlite(-journal|-wal|-shm)?$", r"\.db(-journal)?$", r"^\.ml-model-report\.json$", r"\.tmp\d*$")


def say(message: str) -> None:
    print(f"ml-watch: {message}", file=sys.stderr, flush=True)


def cycle_args(config) -> list[str]:
    """The user's arguments, less ``--ml-watch``, with ``--ml-affected`` (and one process: ``-n0``)."""
    args = [str(arg) for arg in config.invocation_params.args if str(arg) != "--ml-watch"]
    if not any(arg == "--ml-affected" or arg.startswith("--ml-affected=") for arg in args):
        args.append("--ml-affected")
    if config.pluginmanager.has_plugin("xdist"):
        args.append("-n0")  # the cycle is one warm process; xdist workers would start cold in it
    return args


def watched(root: Path) -> list[Path]:
    """The repository's top-level directories and files, less virtualenvs and caches (a watch on
    ``.venv`` would cost an inotify watch for each of its thousands of directories)."""
    return sorted(
        entry
        for entry in root.iterdir()
        if entry.name not in IGNORED_DIRECTORIES and not entry.name.startswith((".venv", ".pytest_cache"))
    )


class Watcher(threading.Thread):
    """The watchfiles loop in a thread of its own: each batch of changed paths goes to ``batches``
    and wakes the main loop through a pipe."""

    def __init__(self, root: Path):
        super().__init__(daemon=True, name="ml-watch")
        self.root = root
        self.stop_event = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)  # signal.set_wakeup_fd writes to it too
        self.batches: list[set[str]] = []
        self.lock = threading.Lock()
        self.filter = watchfiles.DefaultFilter(
            ignore_dirs=sorted({*watchfiles.DefaultFilter.ignore_dirs, *IGNORED_DIRECTORIES}),
            ignore_entity_patterns=[*watchfiles.DefaultFilter.ignore_entity_patterns, *IGNORED_FILES],
        )

    def run(self) -> None:
        changes = watchfiles.watch(
            *watched(self.root), watch_filter=self.filter, step=QUIET_MS, stop_event=self.stop_event, raise_interrupt=False
        )
        for batch in changes:
            with self.lock:
                self.batches.append({path for _, path in batch})
            os.write(self.wake_w, b"x")

    def take(self) -> set[str]:
        """Every path changed since the last take."""
        os.set_blocking(self.wake_r, False)
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)
        with self.lock:
            paths = set().union(*self.batches)
            self.batches.clear()
        return paths

    def close(self) -> None:
        self.stop_event.set()


class Cycle:
    """One run of the affected tests: warm (a child of the server) or, where the server cannot take
    it, a cold subprocess."""

    def __init__(self, args: list[str], state: dict, env_defaults: EnvironmentDefaults):
        started = client.start(state, args, env_defaults)
        self.conn: socket.socket | None = None
        self.process: subprocess.Popen | None = None
        if started is not None:
            self.conn, self.pid = started
        else:
            self.process = subprocess.Popen([sys.executable, "-m", "pytest", *args], process_group=0)
            self.pid = self.process.pid

    def register(self, selector: selectors.BaseSelector) -> None:
        if self.conn is not None:
            selector.register(self.conn, selectors.EVENT_READ, self)

    def ended(self) -> int | None:
        """The cycle's exit status once it has ended (minus the signal that ended it), else None."""
        if self.process is not None:
            code = self.process.poll()
            return None if code is None else code
        ended = caller.status(protocol.receive(self.conn))
        return caller.gone_server(self.pid) if ended is None else ended

    def signal(self, signum: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signum)

    def close(self, selector: selectors.BaseSelector) -> None:
        if self.conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.conn)
            self.conn.close()
        elif self.process is not None:
            self.process.wait()


def main(config, env_defaults: EnvironmentDefaults) -> int:
    """The loop: a first cycle at once, then one per batch of saves; the last finished cycle's exit code."""
    root, args = config.rootpath, cycle_args(config)
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # the cycles write to the caller's own streams
    state = client.caller_state(config)
    watcher = Watcher(root)
    watcher.start()
    say(f"watching {root} (Ctrl-C to stop): each save runs the tests it affects in a warm child")
    interrupted = threading.Event()
    last: int | None = None
    cycle: Cycle | None = Cycle(args, state, env_defaults)
    selector = selectors.DefaultSelector()
    selector.register(watcher.wake_r, selectors.EVENT_READ)
    signal.set_wakeup_fd(watcher.wake_w, warn_on_full_buffer=False)  # a signal wakes the select too

    def ctrl_c(signum, frame):
        interrupted.set()
        if cycle is not None:
            cycle.signal(signal.SIGINT)  # as Ctrl-C interrupts a pytest run

    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        cycle.register(selector)
        while True:
            if cycle is not None and cycle.process is not None:
                timeout = 0.1  # a cold cycle ends without a message: polled
            else:
                timeout = None if cycle is None or cycle.conn is not None else 0.1
            events = selector.select(timeout)
            if cycle is not None and (any(key.data is cycle for key, _ in events) or cycle.process is not None):
                ended = cycle.ended()
                if ended is not None:
                    cycle.close(selector)
                    cycle, last = None, ended
                    if interrupted.is_set():
                        break
                    say("waiting for the next save (Ctrl-C to stop)")
            if interrupted.is_set() and cycle is None:
                break
            saved = watcher.take() if any(key.fileobj == watcher.wake_r for key, _ in events) else set()
            if not saved or interrupted.is_set():
                continue
            shown = ", ".join(sorted(_shown(path, root) for path in saved)[:3]) + (" …" if len(saved) > 3 else "")
            if cycle is not None:
                say(f"saved again ({shown}): the run in progress is cancelled")
                cycle.signal(signal.SIGKILL)
                cycle.ended() if cycle.process is not None else None
                cycle.close(selector)
            say(f"saved {shown}: running the tests it affects")
            cycle = Cycle(args, state, env_defaults)
            cycle.register(selector)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.set_wakeup_fd(-1)
        watcher.close()
        selector.close()
    code = 2 if last is None else (128 - last if last < 0 else last)
    say(f"stopped; the last run's exit code: {code}")
    return code


def _shown(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path
