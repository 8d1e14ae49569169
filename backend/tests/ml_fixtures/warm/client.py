"""A warm run's caller: run in the pytest process the user started with ``--ml-warm``.

The plugin's ``pytest_cmdline_main`` (:func:`cmdline_main`) sends the run — the caller's state and
standard streams, taken before pytest's capture replaced them — to a current server
(``lifecycle.py``), which forks a child that becomes this process and runs the session; this
process then follows the child (``core/caller.py``) and exits as it did. Under xdist
(``--ml-warm -n N``) this process stays xdist's controller and its workers come from the server
(``workers.py``).
"""

from __future__ import annotations

import socket
import sys

from _ml_fixtures_warm_core import caller, protocol
from _ml_fixtures_warm_core.child import WarmChild
from _ml_fixtures_warm_core.identity import EnvironmentDefaults, Identity, Manifest
from _ml_fixtures_warm_core.protocol import CannotRunWarm, ServerFiles, say
from ml_fixtures.warm import lifecycle, workers


def is_child(config) -> bool:
    """Whether this session runs in a warm child (where ``--ml-warm`` runs here)."""
    return any(isinstance(plugin, WarmChild) for plugin in config.pluginmanager.get_plugins())


def cmdline_main(config, env_defaults: EnvironmentDefaults) -> int | None:
    """``--ml-warm-stop``, or ``--ml-warm``'s run: its exit code, or None to run here (cold, a warm
    child, an xdist worker or controller)."""
    if config.getoption("ml_warm_stop"):
        return lifecycle.stop()
    if not config.getoption("ml_warm") or is_child(config) or hasattr(config, "workerinput"):
        return None
    xdist = xdist_options(config)
    if xdist:
        workers.fork_workers(config, xdist, env_defaults)
        return None  # this process is the controller; its workers come from the server
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # fds 0-2 are the caller's own again
    code = run(caller_state(config), [str(arg) for arg in config.invocation_params.args], env_defaults)
    if code is not None and capture is not None:
        capture.read_global_capture()  # what the conftests printed here: the child printed it too
    return code


def xdist_options(config) -> str | None:
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


def caller_state(config) -> dict:
    """This process as the child must become it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return {
        "argv": list(sys.argv),
        "orig_argv": list(sys.orig_argv),
        "cwd": str(config.invocation_params.dir),
        "path": _start_path(config),
        "main": {"file": getattr(main, "__file__", None), "spec": getattr(spec, "name", None)},
        "unbuffered": bool(getattr(sys.__stdout__, "write_through", False)),  # -u or PYTHONUNBUFFERED
        **caller.process_state(),
    }


def run(state: dict, args: list[str], env_defaults: EnvironmentDefaults) -> int | None:
    """Run ``pytest args`` in a child of the warm server; its exit code, or None to run cold."""
    try:
        started = start(state, args, env_defaults)
        return None if started is None else caller.follow(*started, set(state["ignored_signals"]))
    except KeyboardInterrupt:
        say("interrupted")
        return 2


def start(state: dict, args: list[str], env_defaults: EnvironmentDefaults) -> tuple[socket.socket, int] | None:
    """Have a current warm server fork a child that runs ``pytest args`` as this caller would: the
    connection on which its end will come, and its pid; None (said why) where it cannot."""

    def send_run(files: ServerFiles, manifest: Manifest):
        request = {"op": "run", "server": manifest.server_id, "entry": "pytest", "args": args, "caller": state}
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            conn, reply = protocol.request(files.socket, request, fds=[0, 1, 2], timeout=protocol.HANDSHAKE_TIMEOUT_S * 3)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        if "retry" in reply:
            conn.close()
            return None
        return conn, reply

    try:
        identity = Identity.of_this_process(env_defaults)
        conn, reply = lifecycle.with_current_server(identity, env_defaults, list(sys.path), send_run)
    except (CannotRunWarm, OSError) as exc:
        say(f"{exc}; running cold")
        return None
    if "started" not in reply:
        conn.close()
        say(f"{protocol.refusal(reply)}; running cold")
        return None
    return conn, reply["started"]
