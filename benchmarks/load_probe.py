"""A pytest plugin the benchmark adds to every run: counts real loads whatever fixtures are in use.

It wraps the loaders the project declares (every real load, pooled or not, goes through them)
and appends one JSON line per process to ``$BENCH_PROBE_OUT``. The wrappers are removed at
the end, so that runs in one process (the benchmark's smoke test) do not stack them.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "FlagEmbedding")
_loads: list[float] = []
_originals: dict[tuple[str, str], object] = {}


def _counted(load):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            _loads.append(time.perf_counter() - start)

    return wrapper


def own_peak_rss_mb() -> float:
    """This process's peak RSS since it started its program (``VmHWM``).

    Not ``ru_maxrss``: Linux carries that across ``execve`` from the process that started this
    one, so every child of a runner that once held a 2.5 GB model would report at least that.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def pytest_configure(config):
    from ml_models import PROJECT

    _loads.clear()
    for spec in PROJECT.models:
        target = spec.loader_target
        module = importlib.import_module(target[0])
        _originals[target] = getattr(module, target[1])
        setattr(module, target[1], _counted(_originals[target]))


def pytest_unconfigure(config):
    for (module, name), original in _originals.items():
        setattr(sys.modules[module], name, original)
    _originals.clear()
    with open(os.environ["BENCH_PROBE_OUT"], "a") as out:
        out.write(
            json.dumps(
                {
                    "loads": len(_loads),
                    "load_s": sum(_loads),
                    "peak_rss_mb": own_peak_rss_mb(),
                    "heavy_imported": sorted(m for m in HEAVY if m in sys.modules),
                }
            )
            + "\n"
        )
