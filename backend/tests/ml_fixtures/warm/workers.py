"""xdist workers forked from the warm server: run in the xdist controller of ``--ml-warm -n N``.

The controller makes sure a current server runs for it (as a single warm run would), then each
local worker's gateway spec gets ``python=`` the core's launcher (``core/launcher.py``), which
execnet runs in place of ``python -u -c <bootstrap>``; the launcher has the server fork the worker.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from _ml_fixtures_warm_core import protocol
from _ml_fixtures_warm_core.identity import EnvironmentDefaults, Identity, Manifest
from _ml_fixtures_warm_core.protocol import CannotRunWarm, ServerFiles, say
from ml_fixtures.warm import CORE_DIR, lifecycle


def fork_workers(config, xdist: str, env_defaults: EnvironmentDefaults) -> None:
    """Have xdist start its local workers through the launcher (:class:`WarmWorkers`); otherwise one
    line says why and the workers start cold."""
    if xdist == "--looponfail":
        say("--looponfail: its workers cannot fork from the warm server; running cold")
        return
    if getattr(config.option, "numprocesses", None) is None and not any(map(forkable, config.option.tx)):
        say(f"--tx {' '.join(config.option.tx)}: only local popen workers fork from the warm server; running cold")
        return

    def answering(files: ServerFiles, manifest: Manifest):
        try:
            return files if protocol.ping(files.socket).get("server") == manifest.server_id else None
        except (FileNotFoundError, ConnectionRefusedError):
            return None

    try:
        files = lifecycle.with_current_server(Identity.of_this_process(env_defaults), env_defaults, list(sys.path), answering)
        plugin = WarmWorkers(files, env_defaults)
    except (CannotRunWarm, OSError) as exc:
        say(f"{exc}; xdist workers start cold")
        return
    config.pluginmanager.register(plugin, "ml-warm-workers")


def forkable(spec: str) -> bool:
    """A gateway spec (``[N*]popen...``) whose worker xdist starts here in a fresh ``python -u -c``."""
    from execnet import XSpec

    parsed = XSpec(spec.partition("*")[2] if spec.partition("*")[0].isdigit() else spec)
    return bool(parsed.popen) and not (parsed.python or parsed.via or parsed.dont_write_bytecode)


class WarmWorkers:
    """On an xdist controller under ``--ml-warm`` (registered as ``ml-warm-workers``): each local
    worker's gateway spec gets ``python=`` the launcher; restarted workers (``--max-worker-restart``)
    reuse the spec. A launcher that the server cannot serve starts a cold worker instead and notes
    why in a file of this run: this controller says each reason once."""

    def __init__(self, files: ServerFiles, env_defaults: EnvironmentDefaults):
        self.notes = files.directory / f"workers-{os.getpid()}-{time.time_ns()}.cold"
        command = [sys.executable, str(CORE_DIR), "worker", str(files.socket), str(self.notes), *env_defaults.as_arguments()]
        self.launcher = shlex.join(command)
        self.said: set[str] = set()

    def pytest_configure(self, config) -> None:
        """After xdist's ``pytest_cmdline_main`` turned ``-n N`` into N ``popen`` specs, before its session reads them."""
        config.add_cleanup(lambda: self.notes.unlink(missing_ok=True))
        if "//" in self.launcher:  # a gateway spec cannot hold it
            say(f"the launcher's command line contains '//' ({self.launcher}); xdist workers start cold")
            return
        from xdist.workermanage import parse_tx_spec_config

        specs = parse_tx_spec_config(config)
        config.option.tx = [f"{spec}//python={self.launcher}" if forkable(spec) else spec for spec in specs]

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
