"""A warm run's child: run in the process the server forks for each run.

The child becomes what a fresh ``python -m pytest`` of the caller would be (:func:`become`): the
caller's standard streams (passed as file descriptors, taken before pytest's capture replaced
them), working directory, environment, ``sys.path``, ``sys.argv``, warning filters, umask, resource
limits, nice value, CPU affinity, signal mask and ignored signals, and freshly seeded random
generators. Then it runs its entry — a pytest session, or an xdist worker's ``python -c`` — and
ends as the interpreter would (:func:`exit_as_python`), never unwinding into the server's code.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import os
import re
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings

from . import protocol


class WarmChild:
    """Registered as a plugin in a warm child's session: how ``--ml-warm`` there knows not to go warm
    again (an environment variable would reach the tests' own subprocesses)."""


class CannotBecome(Exception):
    """A setting of the caller's that this child cannot take over."""


def run(conn: socket.socket, request: dict, fds: list[int], environment_added: dict[str, str]) -> None:
    """Become the caller's process, tell the caller, run the request's entry, exit as Python would."""
    try:
        become(request["caller"], fds, environment_added)
    except CannotBecome as exc:
        protocol.send_quietly(conn, {"cold": str(exc)})
        os._exit(0)
    except Exception as exc:
        protocol.send_quietly(conn, {"cold": f"the warm child could not become the caller: {type(exc).__name__}: {exc}"})
        os._exit(0)
    protocol.send_quietly(conn, {"started": os.getpid()})
    conn.close()
    exit_as_python(lambda: ENTRIES[request["entry"]](request))


def become(caller: dict, fds: list[int], environment_added: dict[str, str]) -> None:
    os.setpgid(0, 0)
    _take_limits(caller)
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
    _take_signals(caller)


def _take_limits(caller: dict) -> None:
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
        raise CannotBecome(f"cannot take over the caller's limits, nice value or CPUs: {exc}") from exc


def _take_signals(caller: dict) -> None:
    """The caller's ignored signals and mask; every other handler as a new interpreter has it."""
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
    """The caller's warning filters (``caller.filters_out``), with their categories and patterns resolved here."""
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


#: What a child may run: a pytest session, or an xdist worker's interpreter (``launcher.py``).
ENTRIES = {"pytest": _run_pytest, "python -c": _run_code}


def exit_as_python(main) -> None:
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
