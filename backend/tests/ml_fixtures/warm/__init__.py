"""Warm runs: ``pytest --ml-warm ...`` runs the session in a child forked from a per-user server that
has the ML libraries imported already, so a rerun does not pay their 6–8 s import again.

The package is split by the process that runs each part:

- ``core/`` (standard library only, loaded under a private name; see its ``__init__``): the server,
  the forked child, the caller's signal and exit handling, the xdist worker launcher, and what they
  share (the wire protocol, the server's identity and manifest);
- ``client``: the caller's pytest — ``pytest_cmdline_main`` hands the session to a child and follows it;
- ``lifecycle``: the caller's pytest — a current server for the caller: started, waited for, replaced, stopped;
- ``workers``: the xdist controller under ``--ml-warm -n N`` — each worker's gateway goes through the launcher.

A warm run is indistinguishable from a cold one: same output, exit status or death by the same
signal, same environment. Whatever goes wrong, the caller says so in one line and runs cold.
Safety: the socket lives in a directory only the user can enter (0700, under ``$XDG_RUNTIME_DIR``
or the user's cache directory); the server serves only its own uid (SO_PEERCRED), never TCP.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

CORE_DIR = Path(__file__).resolve().parent / "core"
CORE_NAME = "_ml_fixtures_warm_core"


def load_core() -> ModuleType:
    """The core package under its private name: the one a warm child already holds (the server's), or loaded now."""
    if CORE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(CORE_NAME, CORE_DIR / "__init__.py")
        core = importlib.util.module_from_spec(spec)
        sys.modules[CORE_NAME] = core
        spec.loader.exec_module(core)
    return sys.modules[CORE_NAME]
