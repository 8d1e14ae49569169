"""A pytest plugin the benchmark adds to every run: counts real loads whatever fixtures are in use.

It wraps the application's two loaders (every real load, pooled or not, goes through them)
and appends one JSON line per process to ``$BENCH_PROBE_OUT``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

HEAVY = ("torch", "transformers", "FlagEmbedding")
_loads: list[float] = []


def _counted(load):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return load(*args, **kwargs)
        finally:
            _loads.append(time.perf_counter() - start)

    return wrapper


def pytest_configure(config):
    from app.ml import loading

    for name in ("load_sparse_embedding_model", "load_classification_model"):
        setattr(loading, name, _counted(getattr(loading, name)))


def pytest_unconfigure(config):
    with open(os.environ["BENCH_PROBE_OUT"], "a") as out:
        out.write(
            json.dumps(
                {
                    "loads": len(_loads),
                    "load_s": sum(_loads),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "heavy_imported": sorted(m for m in HEAVY if m in sys.modules),
                }
            )
            + "\n"
        )
