"""The benchmark's harness at its smallest, so that it cannot rot. Its timings are never asserted.

The configurations run in this process (pytester), not in fresh ones as ``make bench`` runs them:
what is checked here is that the harness generates the suites, runs every configuration and
counts its loads. The -n 2 configuration is left out (its worker processes are the point; the
xdist self-test covers loads under workers), and so is the torch-import column, which only a
fresh process can tell (the import-light self-test covers it).
"""

import sys
import time

import pytest

from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService
from ml_fixtures.scaffold import REPO

#: The services' own loading seams, taken at collection, before any fixture routes them: the
#: suite "with no fixture library" must load through them, not through this session's routing.
OWN_SEAMS = {cls: vars(cls)["_load_model"] for cls in (SparseEmbeddingService, MLClassificationService)}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import probes
    import run

    return run, probes


def test_the_harness_runs_every_configuration_and_counts_its_loads(bench, pytester, monkeypatch, tmp_path):
    run, probes = bench

    def in_process(root, args):
        for cls, seam in OWN_SEAMS.items():
            monkeypatch.setattr(cls, "_load_model", seam)
        monkeypatch.chdir(root)
        probe_out = root / "probe.jsonl"
        probe_out.unlink(missing_ok=True)
        monkeypatch.setenv("BENCH_PROBE_OUT", str(probe_out))
        start = time.perf_counter()
        result = pytester.runpytest_inprocess("-q", "-p", "load_probe", *args)
        assert result.ret == 0, result.stdout.str()[-3000:]
        return run.measured(probe_out, time.perf_counter() - start)

    out = tmp_path / "bench.json"
    results = run.main(["--smoke", "--output", str(out)], runner=in_process, probe=lambda name, *n: getattr(probes, name)(*n))
    loads = {name: c["loads"]["median"] for name, c in results["configurations"].items()}
    # Smoke sizes: 1 sparse module and 1 classifier module of 2 tests each; 1 unit test on both services.
    assert loads == {
        "scope=function": 4,
        "scope=module": 2,
        "scope=session": 2,
        "peer: session model + deepcopy per test": 2,
        "unit trees, fixture library": 0,
        "unit trees, no fixture library": 2,
        "integration, -n 0": 2,
    }
    assert results["machine"]["cpu_count"] and results["packages"]["torch"] == "2.13.0+cpu"
    assert results["floor"]["calls"] == 4 and results["floor"]["import_s"] >= 0
    assert results["quantize"]["texts"] == 12
    assert 0 <= results["quantize"]["top1_agreement"] <= 1
    assert "| scope=session |" in results["markdown"]
    assert out.exists() and "load_probe" not in sys.modules.get("app.ml.loading").load_classification_model.__qualname__
