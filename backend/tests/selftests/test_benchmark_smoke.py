"""The benchmark at tiny sizes, so that it cannot rot. Its timings are never asserted."""

import json
import subprocess
import sys

from ml_fixtures.scaffold import REPO


def test_benchmark_runs_and_counts_loads_per_configuration(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke", "--output", str(out)],
        check=True,
        timeout=900,
        capture_output=True,
    )
    results = json.loads(out.read_text())
    loads = {name: c["loads"]["median"] for name, c in results["configurations"].items()}
    # Smoke sizes: 2 sparse modules and 1 classifier module of 2 tests each; 2 unit modules of 2.
    assert loads == {
        "scope=function": 6,
        "scope=module": 3,
        "scope=session": 2,
        "peer: session model + deepcopy per test": 2,
        "unit trees, fixture library": 0,
        "unit trees, no fixture library": 8,
        "integration, -n 0": 2,
        "integration, -n 2 --dist loadgroup": 2,
    }
    assert not results["configurations"]["unit trees, fixture library"]["torch_imported"]
    assert results["configurations"]["unit trees, no fixture library"]["torch_imported"]
    assert results["machine"]["cpu_count"] and results["packages"]["torch"] == "2.13.0+cpu"
    assert 0 <= results["quantize"]["top1_agreement"] <= 1
    assert "| scope=session |" in results["markdown"]
