"""The benchmark's parts at their smallest, so that they cannot rot. Timings are never asserted.

The configurations run in this process (pytester), not in fresh ones as ``make bench`` runs them:
what is checked is that the harness generates the suites, runs every configuration and counts
its loads. The -n 2 configuration is left out (its worker processes are the point; the xdist
self-test covers loads under workers), and so is the torch-import column, which only a fresh
process can tell (the import-light self-test covers it). One fresh process is started, by the
harness's own runner: the claim there is about what a child process reports. The peers section
needs the peers installed (``make bench``'s own virtualenv); its parsing and rendering are checked here.
"""

import json
import time

import psutil
import pytest

from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService
from selftests.conftest import REPO

#: The services' own loading seams, taken at collection, before any fixture routes them: the
#: suite "with no fixture library" must load through them, not through this session's routing.
OWN_SEAMS = {cls: vars(cls)["_load_model"] for cls in (SparseEmbeddingService, MLClassificationService)}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import chart
    import probes
    import run

    return run, probes, chart


@pytest.mark.slow
def test_the_harness_runs_every_configuration_and_counts_its_loads(bench, pytester, monkeypatch, tmp_path):
    run, _, _ = bench

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

    configs = run.configurations(tmp_path, run.SMOKE_SIZES)
    results = run.alternate({k: v for k, v in configs.items() if k not in run.SEPARATE_PROCESSES}, 1, in_process)
    # Smoke sizes: 1 sparse module and 1 classifier module of 2 tests each; 1 unit test on both services.
    assert {name: c["loads"]["median"] for name, c in results.items()} == {
        "scope=function": 4,
        "scope=module": 2,
        "scope=session": 2,
        "peer: session model + deepcopy per test": 2,
        "unit trees, fixture library": 0,
        "unit trees, no fixture library": 2,
        "integration, -n 0": 2,
    }
    assert all(c["wall_s"]["median"] > 0 and len(c["runs"]) == 1 for c in results.values())


def test_the_unit_section_times_both_trees_and_renders_ms_per_test_over_the_floor(bench, pytester, monkeypatch, tmp_path):
    run, _, _ = bench

    def in_process(root, args):
        monkeypatch.chdir(root)
        start = time.perf_counter()
        result = pytester.runpytest_inprocess("-q", *args)
        assert result.ret == 0, result.stdout.str()[-3000:]
        stdout = result.stdout.str()
        return {
            "wall_s": time.perf_counter() - start,
            "session_s": run.session_seconds(stdout),
            "outcome": run.outcome(stdout),
            "torch_imported": False,
        }

    section = run.unit_section(tmp_path, run.SMOKE_SIZES, 1, in_process)
    configs = section["configurations"]
    # One untimed run of each, then the timed one: both trees hold the smoke sizes' one unit test.
    assert {name: [r["outcome"] for r in c["runs"]] for name, c in configs.items()} == {
        run.UNIT_LIBRARY: [{"passed": 1}],
        run.UNIT_FLOOR: [{"passed": 1}],
    }
    library, floor = (configs[name]["session_s"]["median"] for name in (run.UNIT_LIBRARY, run.UNIT_FLOOR))
    assert section["over_floor_ms_per_test"]["median"] == pytest.approx(1000 * (library - floor))
    table = run.markdown({"unit": section})
    assert f"| {run.UNIT_LIBRARY} |" in table and f"| {run.UNIT_FLOOR} |" in table
    assert "The fixture library over the floor:" in table


@pytest.mark.slow
def test_the_bare_process_probes_measure_the_floor_and_int8(bench):
    _, probes, _ = bench
    floor = probes.floor(4)
    assert floor["calls"] == 4 and min(floor[k] for k in ("import_s", "load_sparse_s", "inference_s")) >= 0
    quantize = probes.quantize(1, 12)
    assert quantize["texts"] == 12 and quantize["queries"] == 3
    assert 0 <= quantize["top1_agreement"] <= 1 and 0 <= quantize["top10_overlap"] <= 1
    assert quantize["int8"]["load_sparse_s"] > 0


@pytest.mark.slow
def test_the_committed_results_render_as_tables_and_a_chart(bench, tmp_path):
    run, _, chart = bench
    results = json.loads((REPO / "benchmarks" / "results" / "latest.json").read_text())
    table = run.markdown(results)
    for name in results["configurations"]:
        assert f"| {name} |" in table
    png = chart.draw(results, tmp_path / "latest.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_a_run_reports_its_own_peak_memory_not_the_runners(bench, tmp_path):
    """Linux carries a process's RSS high-water mark across execve into the children it starts:
    a runner that built a 2.2 GB model made every run report at least that (ru_maxrss)."""
    run, _, _ = bench
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (tmp_path / "test_tiny.py").write_text("def test_tiny():\n    pass\n")
    ballast = b"\x01" * (800 * 2**20)  # written, so resident in this process
    assert psutil.Process().memory_info().rss > len(ballast)
    result = run.run_pytest(tmp_path, [], memory=False)
    del ballast
    assert result["processes"] == 1 and result["outcome"] == {"passed": 1} and result["exit_code"] == 0
    assert result["peak_rss_mb"] < 300


def test_the_outcome_of_a_run_is_read_from_pytests_summary(bench, pytester):
    run, _, _ = bench
    pytester.makepyfile(
        """
        import pytest

        def test_passes():
            pass

        def test_fails():
            assert False

        @pytest.mark.skip
        def test_skipped():
            pass
        """
    )
    stdout = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider").stdout.str()
    assert run.outcome(stdout) == {"failed": 1, "passed": 1, "skipped": 1}
    assert run.session_seconds(stdout) >= 0


def test_each_run_keeps_the_peers_plugins_out_but_its_own(bench):
    run, _, _ = bench
    assert run.peer_blocks(["backend/tests"]) == ["-p", "no:zygote", "-p", "no:parallex", "-p", "no:pytest_fast"]
    assert run.peer_blocks(["--workers", "2"]) == ["-p", "no:parallex", "-p", "no:pytest_fast"]
    assert run.peer_blocks(["--parallel=fork"]) == ["-p", "no:zygote", "-p", "no:pytest_fast"]
    configs = run.peer_configurations(REPO, run.PEERS_TREE)
    assert all(run.PEERS_TREE in args for _, args, _ in configs.values()) and set(run.RESIDENT) <= set(configs)


def test_a_peers_section_renders_as_a_table_and_a_chart(bench, tmp_path):
    run, _, chart = bench

    def ran(wall, exit_code, **counts):
        return {"wall_s": wall, "exit_code": exit_code, "outcome": counts, "pss_mb": 600.0, "torch_imported": True}

    section = {
        "tree": run.PEERS_TREE,
        "runs": 2,
        "configurations": {
            "cold (one process)": run.summarize([ran(16.0, 0, passed=30), ran(18.0, 0, passed=30)]),
            "pytest-fast --fast": run.summarize([ran(20.0, 0, passed=30), ran(22.0, 1, passed=29, failed=1)]),
        },
    }
    table = run.markdown({"peers": section})
    assert "| cold (one process) | 17.0 [16.0–18.0] | exit 0: 30 passed | 600 [600–600] | 1.00 |" in table
    assert "| pytest-fast --fast | 21.0 [20.0–22.0] | exit 0: 30 passed; exit 1: 29 passed, 1 failed |" in table
    results = {"peers": section, "date": "today", "machine": {"cpu_count": 2}}
    png = chart.draw(results, tmp_path / "peers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_concurrency_and_selection_sections_render_as_tables_and_a_chart(bench, tmp_path):
    run, _, chart = bench
    import concurrency
    import selection

    def at_once(wall, *each):
        return {"wall_s": wall, "runs": [{"wall_s": s, "exit_code": 0, "summary": "15 passed"} for s in each]}

    names = list(concurrency.configurations(2))
    concurrent = {
        "target": concurrency.TARGET, "runs_at_once": 2, "repeats": 2,
        "configurations": {
            names[0]: concurrency._summarize([at_once(8.0, 8.0), at_once(10.0, 10.0)]),
            names[1]: concurrency._summarize([at_once(20.0, 19.0, 20.0), at_once(22.0, 21.0, 22.0)]),
            names[3]: concurrency._summarize([at_once(4.0, 3.0, 4.0), at_once(6.0, 5.0, 6.0)]),
        },
    }  # fmt: skip
    stat = selection._stat
    missed = {"selected": 3, "missed": []}
    chosen = {
        "record_cost": {"trees": selection.APP_TREES, "tests": 83, "configurations": {"record kept": stat([20.0, 22.0])}},
        "overhead": {"suite": {"tests": None, "collect_only_s": stat([1.0]), "ml_affected_collect_only_s": stat([1.2]),
                               "overhead_ms": stat([200.0])}},
        "edits": {"tests": 12, "edits": {"a fake": {"failing": ["t"], "ml_affected": missed,
                                                    "testmon": {"selected": 0, "missed": ["t"]}}}},
        "watch": {"--ml-watch": stat([1.5, 2.5]), "ptw": stat([9.0, 11.0])},
    }  # fmt: skip
    table = run.markdown({"concurrency": concurrent, "selection": chosen})
    assert f"| {names[3]} | 5.0 [4.0–6.0] | 4.5 [3.0–6.0] | exit 0: 15 passed | 0.24 |" in table
    assert "| a fake | 1 | 3 (0 missed) | 0 (1 missed) |" in table and "| ptw | 10.00 [9.00–11.00] |" in table
    results = {"concurrency": concurrent, "selection": chosen, "date": "today", "machine": {"cpu_count": 2}}
    png = chart.draw(results, tmp_path / "sections.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
