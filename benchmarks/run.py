"""Benchmark of the ML fixture library: `make bench` (or `python benchmarks/run.py --help`).

Every configuration runs in fresh processes, the configurations alternating (A B C A B C ...),
and the table quotes the median with min and max. Results go to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "backend"), str(REPO / "backend" / "tests"), str(HERE)]

import chart  # noqa: E402
import concurrency  # noqa: E402
import selection  # noqa: E402
from ml_fixtures import scaffold  # noqa: E402
from ml_models import PROJECT  # noqa: E402
from suite import PEER_FIXTURES, SCALE_TEST, Sizes, generate, generate_bare_unit, generate_trivial_unit  # noqa: E402

PACKAGES = ("torch", "transformers", "FlagEmbedding", "pytest", "pytest-xdist", "SQLAlchemy")
#: Recorded where installed (the peers section needs them).
OPTIONAL_PACKAGES = ("pytest-zygote", "pytest-parallex", "pytest-fast")


class MemorySampler(threading.Thread):
    """Samples the summed PSS of a process and all its descendants until stopped; keeps the peak.

    PSS (proportional set size) charges each shared page to its processes in equal parts, so the
    sum over processes counts a memory-mapped model that two workers share once, where summing
    their RSS would count it twice. ``resident``: also count the process trees of the resident
    servers whose command line holds that text (the warm server, pytest-fast's daemon): the run's
    work happens in their children, outside the caller's tree, and their own memory serves it.
    """

    def __init__(self, pid: int, interval: float = 0.2, resident: str | None = None):
        super().__init__(daemon=True)
        self.root, self.interval, self.resident = psutil.Process(pid), interval, resident
        self.peak_pss = 0
        self._stop_event = threading.Event()

    def processes(self) -> list[psutil.Process]:
        roots = [self.root, *(resident_servers(self.resident) if self.resident else ())]
        found: dict[int, psutil.Process] = {}
        for root in roots:
            try:
                found.update((p.pid, p) for p in [root, *root.children(recursive=True)])
            except psutil.Error:  # exited meanwhile
                pass
        return list(found.values())

    def sample(self) -> int:
        total = 0
        for process in self.processes():
            try:
                total += process.memory_full_info().pss
            except psutil.Error:  # exited between the listing and the read
                pass
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_pss = max(self.peak_pss, self.sample())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_pss


def resident_servers(marker: str) -> list[psutil.Process]:
    """The processes whose command line mentions ``marker`` (a path private to this benchmark)."""
    return [
        p for p in psutil.process_iter(["cmdline"]) if any(marker in arg for arg in p.info["cmdline"] or ())
    ]


#: The peers' pytest plugins (entry-point name: the option that turns each on). Every run blocks
#: those whose option it does not use, so that an installed peer changes no other run.
PEER_PLUGINS = {"zygote": "--workers", "parallex": "--parallel", "pytest_fast": "--fast"}


def peer_blocks(args: list[str]) -> list[str]:
    used = {arg.split("=")[0] for arg in args}
    return [arg for name, option in PEER_PLUGINS.items() if option not in used for arg in ("-p", f"no:{name}")]


def run_pytest(
    root: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    memory: bool = True,
    check: bool = True,
    resident: str | None = None,
) -> dict:
    """One fresh pytest process: wall seconds, the session's own seconds (pytest's summary line),
    its outcome, summed PSS over its process tree (unless ``memory`` is off; with the trees of the
    ``resident`` servers, see :class:`MemorySampler`), and the load probe's numbers. A failed run
    raises unless ``check`` is off."""
    with tempfile.TemporaryDirectory(prefix="ml-bench-probe-") as probe_dir:
        probe_out = Path(probe_dir) / "probe.jsonl"
        env = {
            **os.environ,
            **(env or {}),
            "PYTHONPATH": os.pathsep.join(scaffold.python_path(PROJECT, HERE)),
            "BENCH_PROBE_OUT": str(probe_out),
        }
        command = [sys.executable, "-m", "pytest", "-q", "-p", "load_probe", *peer_blocks(args), *args]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = MemorySampler(process.pid, resident=resident)
        if memory:
            sampler.start()
        stdout, stderr = process.communicate()
        wall = time.perf_counter() - start
        peak_pss = sampler.stop() if memory else None
        if check and process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed in {root}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
        result = {
            **measured(probe_out, wall),
            "session_s": session_seconds(stdout),
            "exit_code": process.returncode,
            "outcome": outcome(stdout),
        }
    if peak_pss is not None:
        result["pss_mb"] = peak_pss / 2**20
    return result


def _summary_line(stdout: str) -> str:
    """pytest's last line ("5 passed, 1 skipped in 2.91s"), wherever a plugin's lines follow it."""
    lines = [line for line in stdout.strip().splitlines() if re.search(r" in [0-9.]+s", line)]
    return lines[-1] if lines else ""


def session_seconds(stdout: str) -> float:
    """The seconds pytest reports for its session ("5 passed in 2.91s")."""
    match = re.search(r" in ([0-9.]+)s", _summary_line(stdout))
    return float(match.group(1)) if match else float("nan")


def outcome(stdout: str) -> dict[str, int]:
    """The counts of pytest's summary line: {"passed": 30, "skipped": 2}."""
    counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", _summary_line(stdout))
    return {kind if kind != "error" else "errors": int(n) for n, kind in counts}


def measured(probe_out: Path, wall: float) -> dict:
    """One run's numbers from the load probe's lines (one per pytest process of the run that loads
    the probe: not a process forked from another, which ends without unconfiguring)."""
    processes = [json.loads(line) for line in probe_out.read_text().splitlines()] if probe_out.exists() else []
    result = {
        "wall_s": wall,
        "loads": sum(p["loads"] for p in processes),
        "load_s": sum(p["load_s"] for p in processes),
        "processes": len(processes),
        "torch_imported": any("torch" in p["heavy_imported"] for p in processes),
    }
    if processes:
        #: The largest peak RSS of one process (each process's own VmHWM), for comparison with PSS.
        result["peak_rss_mb"] = max(p["peak_rss_mb"] for p in processes)
    return result


def run_probe(name: str, *numbers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(scaffold.python_path(PROJECT))}
    done = subprocess.run(
        [sys.executable, str(HERE / "probes.py"), name, *map(str, numbers)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for field in ("wall_s", "session_s", "loads", "load_s", "pss_mb", "peak_rss_mb"):
        values = [run[field] for run in runs if field in run]
        if not values:
            continue
        summary[field] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    summary["torch_imported"] = any(run["torch_imported"] for run in runs)
    if all("exit_code" in run for run in runs):
        #: Each different outcome once: one entry where every run ended alike.
        summary["outcomes"] = [dict(t) for t in dict.fromkeys(tuple(_ended(run).items()) for run in runs)]
    summary["runs"] = runs
    return summary


def _ended(run: dict) -> dict:
    return {"exit_code": run["exit_code"], **run["outcome"]}


def configurations(workdir: Path, sizes: Sizes) -> dict[str, tuple[Path, list[str]]]:
    pooled, peer, bare = workdir / "pooled", workdir / "peer", workdir / "bare"
    for path in (pooled, peer, bare):
        path.mkdir()
    generate(pooled, sizes)
    generate(peer, sizes, integration_fixtures=PEER_FIXTURES)
    generate_bare_unit(bare, sizes)
    return {
        "scope=function": (pooled, ["--ml-model-scope=function"]),
        "scope=module": (pooled, ["--ml-model-scope=module"]),
        "scope=session": (pooled, ["--ml-model-scope=session"]),
        "peer: session model + deepcopy per test": (peer, []),
        "unit trees, fixture library": (pooled, ["unit"]),
        "unit trees, no fixture library": (bare, ["unit"]),
        "integration, -n 0": (pooled, ["integration", "-n", "0"]),
        "integration, -n 2 --dist loadgroup": (pooled, ["integration", "-n", "2", "--dist", "loadgroup"]),
    }


def _range(stat: dict, digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} [{stat['min']:.{digits}f}–{stat['max']:.{digits}f}]"


def markdown(results: dict) -> str:
    """The tables of every section that ``results`` has."""
    lines = core_markdown(results) if "configurations" in results else []
    if "unit" in results:
        lines += ["", *unit_markdown(results["unit"])]
    if "scale" in results:
        lines += ["", *scale_markdown(results["scale"])]
    if "warm" in results:
        lines += ["", *warm_markdown(results["warm"])]
    if "peers" in results:
        lines += ["", *peers_markdown(results["peers"])]
    if "concurrency" in results:
        lines += ["", *concurrency.markdown(results["concurrency"])]
    if "selection" in results:
        lines += ["", *selection.markdown(results["selection"])]
    return "\n".join(lines).strip()


def core_markdown(results: dict) -> list[str]:
    configs, sizes = results["configurations"], Sizes(**results["sizes"])
    function_wall = configs["scope=function"]["wall_s"]["median"]
    lines = [
        f"Suite: {sizes.integration_tests} integration tests ({sizes.sparse_modules} sparse + "
        f"{sizes.classifier_modules} classifier modules), {sizes.unit_tests} unit tests; "
        f"{results['runs']} runs each, alternating; median [min–max]. "
        f"{results['machine']['cpu_count']} CPUs, {results['date']}.",
        "",
        "| configuration | wall s | real loads | load s | memory MB (summed PSS) | peak RSS MB (one process) | wall / function |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        ratio = c["wall_s"]["median"] / function_wall
        lines.append(
            f"| {name} | {_range(c['wall_s'])} | {_range(c['loads'], 0)} | {_range(c['load_s'])} | "
            f"{_range(c['pss_mb'], 0) if 'pss_mb' in c else '–'} | {_range(c['peak_rss_mb'], 0)} | {ratio:.2f} |"
        )
    with_lib, without = configs["unit trees, fixture library"], configs["unit trees, no fixture library"]
    floor = results["floor"]
    floor_total = floor["import_s"] + floor["load_sparse_s"] + floor["load_classifier_s"] + floor["inference_s"]
    integration = configs["integration, -n 0"]["wall_s"]["median"]
    lines += [
        "",
        f"Unit speed (process wall / {sizes.unit_tests} tests): fixture library "
        f"{1000 * with_lib['wall_s']['median'] / sizes.unit_tests:.1f} ms/test, torch imported: "
        f"{'yes' if with_lib['torch_imported'] else 'no'}; no fixture library "
        f"{1000 * without['wall_s']['median'] / sizes.unit_tests:.1f} ms/test, torch imported: "
        f"{'yes' if without['torch_imported'] else 'no'}.",
        "",
        f"Floor in a bare process: import torch + transformers + FlagEmbedding {floor['import_s']:.2f} s, "
        f"load BGE-M3 {floor['load_sparse_s']:.2f} s, load classifier {floor['load_classifier_s']:.2f} s, "
        f"{floor['calls']} calls of each model {floor['inference_s']:.2f} s: {floor_total:.2f} s. "
        f"The integration part at scope=session (-n 0) takes {integration:.2f} s, "
        f"{integration - floor_total:.2f} s above that floor (interpreter, pytest, collection, database).",
    ]
    q = results.get("quantize")
    if q:
        lines += [
            "",
            f"Quantized (int8, CPU) against fp32, on the shipped dataset ({q['texts']} texts, {q['queries']} queries):",
            "",
            "| | load BGE-M3 s | load classifier s | encode all s | classify all s | classifier accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for dtype in ("fp32", "int8"):
            d = q[dtype]
            lines.append(
                f"| {dtype} | {d['load_sparse_s']:.2f} | {d['load_classifier_s']:.2f} | {d['sparse_encode_s']:.2f} | "
                f"{d['classify_s']:.2f} | {d['accuracy']:.3f} |"
            )
        lines += [
            "",
            f"Top-1 classification agreement int8 vs fp32: {q['top1_agreement']:.3f}; "
            f"mean overlap of top-10 sparse search results: {q['top10_overlap']:.3f}.",
        ]
    return lines


def scale_markdown(scale: dict) -> list[str]:
    configs = scale["configurations"]
    function_wall = configs["scope=function"]["wall_s"]["median"]
    lines = [
        f"Seed scale: {scale['model']} ({scale['parameters'] / 1e6:.0f}M parameters, {scale['model_gb']:.2f} GB on disk); "
        f"{scale['tests']} tests in {scale['modules']} modules; {scale['runs']} runs each, alternating; median [min–max].",
        "",
        "| configuration | wall s | real loads | load s | memory MB (summed PSS) | peak RSS MB (one process) | processes "
        "| wall / function |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        lines.append(
            f"| {name} | {_range(c['wall_s'])} | {_range(c['loads'], 0)} | {_range(c['load_s'])} | "
            f"{_range(c['pss_mb'], 0)} | {_range(c['peak_rss_mb'], 0)} | {c['runs'][0]['processes']} | "
            f"{c['wall_s']['median'] / function_wall:.2f} |"
        )
    check = scale.get("modification_check")
    if check:
        lines += ["", f"Modified-shared-model check (`probes.py check_cost {check['repeats']}`), per model:"]
        for name, c in check.items():
            if name == "repeats":
                continue
            at_module_end = f"; at the end of each module {c['deferred_check_ms_median']:.1f} ms"
            deferred = "" if c["pages_scanned_per_test"] else at_module_end
            lines.append(
                f"- {name} ({c['tensors']} tensors, {c['modules']} modules, {c['mapped_pages']} mapped pages): "
                f"{c['check_ms_median']:.2f} ms per test (median, max {c['check_ms_max']:.2f} ms){deferred}; "
                f"the snapshot at load {c['snapshot_ms']:.1f} ms."
            )
    return lines


UNIT_LIBRARY = "fixture library: test_db, both services on the fakes"
UNIT_FLOOR = "floor: trivial tests, bare pytest"
#: Bytecode on, as `make test` runs: the imports and pytest's rewritten test modules come from their
#: caches, as on every run after a developer's first.
UNIT_ENV = {"PYTHONDONTWRITEBYTECODE": ""}
#: Pairs of unit runs (library, floor) per benchmark run: runs of half a second vary by a third on this machine.
UNIT_PAIRS = 3


def unit_configurations(workdir: Path, sizes: Sizes) -> dict[str, tuple[Path, list[str]]]:
    """The generated unit modules on the fixture library, and as many trivial tests in as many modules, bare."""
    library, floor = workdir / "unit-library", workdir / "unit-floor"
    for path in (library, floor):
        path.mkdir()
    generate(library, replace(sizes, sparse_modules=0, classifier_modules=0))
    generate_trivial_unit(floor, sizes)
    return {UNIT_LIBRARY: (library, ["unit", "-n", "0"]), UNIT_FLOOR: (floor, ["unit", "-n", "0"])}


def unit_section(workdir: Path, sizes: Sizes, runs: int, runner) -> dict:
    """pytest's own session time for the unit modules on the fixture library and for the floor, runs
    alternating, after one untimed run of each (which writes the bytecode caches the timed ones read).

    Over the floor: per pair of neighbouring runs, (library − floor) / tests, so that a load that
    comes and goes on a shared machine moves both halves of a pair alike.
    """
    configs = unit_configurations(workdir, sizes)
    for root, args in configs.values():
        runner(root, args)
    results = alternate(configs, runs, runner, label="unit ")
    pairs = zip(results[UNIT_LIBRARY]["runs"], results[UNIT_FLOOR]["runs"])
    over = [1000 * (library["session_s"] - floor["session_s"]) / sizes.unit_tests for library, floor in pairs]
    return {
        "date": datetime.date.today().isoformat(),
        "tests": sizes.unit_tests,
        "modules": sizes.unit_modules,
        "runs": runs,
        "configurations": results,
        "over_floor_ms_per_test": {"median": statistics.median(over), "min": min(over), "max": max(over)},
    }


def unit_markdown(section: dict) -> list[str]:
    configs, tests = section["configurations"], section["tests"]
    over = section["over_floor_ms_per_test"]
    lines = [
        f"Unit tests at pytest's own cost: {tests} unit tests shaped like the suite's (`test_db`, "
        "`SparseEmbeddingService(test_db).generate_embedding`, `MLClassificationService(test_db).predict` on the "
        f"fakes) against {tests} trivial parametrized tests in a bare directory, the floor; both in {section['modules']} "
        "modules, `-n 0`, pytest's session time (\"in X s\" of its summary line), bytecode cached; "
        f"{section['runs']} runs each, alternating, after an untimed one; median [min–max]. {section['date']}.",
        "",
        "| configuration | session s | ms per test |",
        "|---|---|---|",
    ]
    for name, c in configs.items():
        per_test = {k: 1000 * v / tests for k, v in c["session_s"].items()}
        lines.append(f"| {name} | {_range(c['session_s'], 2)} | {_range(per_test, 2)} |")
    lines += [
        "",
        f"The fixture library over the floor: {_range(over, 2)} ms a test (per pair of neighbouring runs).",
    ]
    return lines


def scale_configurations(workdir: Path, modules: int, tests: int) -> dict[str, tuple[Path, list[str]]]:
    """The seed-scale suite: BGE-M3 modules only, pooled and peer, one process and two."""
    pooled, peer = workdir / "scale-pooled", workdir / "scale-peer"
    sizes = Sizes(sparse_modules=modules, classifier_modules=0, unit_modules=0, tests_per_integration_module=tests)
    for path in (pooled, peer):
        path.mkdir()
    generate(pooled, sizes, sparse_test=SCALE_TEST)
    generate(peer, sizes, integration_fixtures=PEER_FIXTURES, sparse_test=SCALE_TEST)
    return {
        "scope=function": (pooled, ["--ml-model-scope=function"]),
        "scope=module": (pooled, ["--ml-model-scope=module"]),
        "scope=session": (pooled, ["--ml-model-scope=session"]),
        "peer: session model + deepcopy per test": (peer, []),
        "-n 2 (--dist load), scope=session": (pooled, ["-n", "2", "--dist", "load"]),
    }


def parameter_count(model_dir: Path) -> int:
    """Parameters in a model directory's safetensors and head files, read from headers and tensors' shapes."""
    import math

    import torch
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    for head in model_dir.glob("*_linear.pt"):
        total += sum(t.numel() for t in torch.load(head, weights_only=True, map_location="cpu").values())
    return total


def alternate(configs: dict[str, tuple], runs: int, runner, label: str = "", **kwargs) -> dict:
    """Run every configuration ``runs`` times, alternating; the summaries by name. A configuration
    is ``(root, pytest_args)``, or ``(root, pytest_args, runner_kwargs)`` with keywords of its own."""
    raw: dict[str, list[dict]] = {name: [] for name in configs}
    for run in range(runs):
        for name, (root, pytest_args, *own) in configs.items():
            raw[name].append(runner(root, pytest_args, **kwargs, **(own[0] if own else {})))
            print(f"run {run + 1}/{runs} {label}{name}: {raw[name][-1]['wall_s']:.1f} s", file=sys.stderr)
    return {name: summarize(r) for name, r in raw.items()}


def scale_section(workdir: Path, runs: int, modules: int = 4, tests: int = 3) -> dict:
    from app.ml.seed_scale import seed_scale_bge_m3_dir

    model_dir = seed_scale_bge_m3_dir()
    configs = scale_configurations(workdir, modules, tests)
    env = {"SPARSE_EMBEDDING_MODEL_PATH": str(model_dir)}
    return {
        "model": "bge-m3 architecture, seeded random weights (app/ml/seed_scale.py)",
        "modification_check": run_probe("check_cost", 1000),
        "parameters": parameter_count(model_dir),
        "model_gb": sum(f.stat().st_size for f in model_dir.iterdir()) / 1e9,
        "modules": modules,
        "tests": modules * tests,
        "runs": runs,
        "configurations": alternate(configs, runs, run_pytest, label="scale ", env=env),
    }


def stop_warm_servers(env: dict[str, str]) -> None:
    """``pytest --ml-warm-stop`` for the servers of ``env``'s ``ML_WARM_DIR``."""
    subprocess.run([sys.executable, "-m", "pytest", "--ml-warm-stop"], cwd=REPO, env={**os.environ, **env}, capture_output=True)


def warm_section(workdir: Path, runs: int) -> dict:
    """This repository's own integration tests, cold against --ml-warm, runs alternating.

    The warm server is started (untimed) before the first run and stopped after the last; memory
    is not sampled, since the warm child belongs to the server's process tree, not the caller's.
    """
    env = {"ML_WARM_DIR": str(workdir / "warm"), "PYTHONDONTWRITEBYTECODE": ""}
    targets = {
        "one integration module (phase4_hybrid_search)": "backend/tests/integration/phase4_hybrid_search",
        "integration tree": "backend/tests/integration",
    }
    configs = {}
    for label, path in targets.items():
        configs[f"{label}, cold"] = (REPO, ["-p", "no:cacheprovider", path])
        configs[f"{label}, warm"] = (REPO, ["-p", "no:cacheprovider", "--ml-warm", path])
    run_pytest(REPO, ["-p", "no:cacheprovider", "--ml-warm", "--collect-only", next(iter(targets.values()))], env, memory=False)
    try:
        results = alternate(configs, runs, run_pytest, label="warm ", env=env, memory=False)
    finally:
        stop_warm_servers(env)
    return {"runs": runs, "configurations": results}


def warm_markdown(section: dict) -> list[str]:
    configs = section["configurations"]
    lines = [
        f"Warm runs: this repository's integration tests, cold against `--ml-warm`; {section['runs']} runs each, "
        "alternating; median [min–max]. Overhead is the wall time outside pytest's own session "
        "(interpreter, imports, configuration; for warm: the caller, the fork and the child's configuration).",
        "",
        "| configuration | wall s | session s | overhead s | real loads | load s | warm / cold |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        cold = configs[name.replace(", warm", ", cold")]["wall_s"]["median"]
        overhead = [r["wall_s"] - r["session_s"] for r in c["runs"]]
        lines.append(
            f"| {name} | {_range(c['wall_s'])} | {_range(c['session_s'], 2)} | "
            f"{_range({'median': statistics.median(overhead), 'min': min(overhead), 'max': max(overhead)}, 2)} | "
            f"{_range(c['loads'], 0)} | {_range(c['load_s'], 2)} | {c['wall_s']['median'] / cold:.2f} |"
        )
    return lines


PEERS_TREE = "backend/tests/integration"
PEERS_SMOKE_TREE = "backend/tests/integration/phase4_hybrid_search"
#: pip distribution of each peer (requirements-bench.txt pins them).
PEER_DISTRIBUTIONS = ("pytest-zygote", "pytest-parallex", "pytest-fast")


def peer_configurations(workdir: Path, tree: str) -> dict[str, tuple]:
    """Ours and the peers' ways to run ``tree``, each as ``(root, args, runner keywords)``.

    A configuration that runs in a resident server's children (``--ml-warm``, pytest-fast's
    daemon) has its memory sampled with that server's process tree.
    """
    warm = {"resident": str(workdir / "warm")}
    fast_address = workdir / "fast" / "daemon.sock"
    return {
        "cold (one process)": (REPO, [tree], {}),
        "--ml-warm": (REPO, ["--ml-warm", tree], warm),
        "--ml-warm -n 2": (REPO, ["--ml-warm", "-n", "2", tree], warm),
        "pytest-xdist -n 2": (REPO, ["-n", "2", tree], {}),
        "pytest-zygote --workers 2": (REPO, ["--workers", "2", tree], {}),
        "pytest-parallex --parallel=fork --parallel-workers 2": (REPO, ["--parallel=fork", "--parallel-workers", "2", tree], {}),
        "pytest-fast --fast": (REPO, ["--fast", f"--fast-address={fast_address}", tree], {"resident": str(fast_address)}),
    }


#: Configurations whose resident server is started by one untimed run before the timed ones.
RESIDENT = ("--ml-warm", "pytest-fast --fast")


def peers_section(workdir: Path, runs: int, tree: str = PEERS_TREE) -> dict:
    """This repository's integration tree run our ways and the peers' ways, alternating.

    Outcomes are recorded, not required: a peer that fails tests shows it in its row. The warm
    server and pytest-fast's daemon are started (untimed) before the first timed run and stopped
    after the last.
    """
    missing = [name for name in PEER_DISTRIBUTIONS if not _installed(name)]
    if missing:
        raise SystemExit(
            f"peers: {', '.join(missing)} not installed here; `make bench` runs in .venv-bench, which has "
            "requirements-bench.txt (or: pip install -r requirements-bench.txt)"
        )
    (workdir / "fast").mkdir()
    env = {"ML_WARM_DIR": str(workdir / "warm"), "PYTHONDONTWRITEBYTECODE": ""}
    configs = {
        name: (root, ["-p", "no:cacheprovider", *args], own)
        for name, (root, args, own) in peer_configurations(workdir, tree).items()
    }
    try:
        for name in RESIDENT:
            root, args, _ = configs[name]
            run_pytest(root, args, env, memory=False, check=False)
        results = alternate(configs, runs, run_pytest, label="peers ", env=env, check=False)
    finally:
        stop_warm_servers(env)
        for daemon in resident_servers(str(workdir / "fast")):  # pytest-fast's daemon, which this section started
            with contextlib.suppress(psutil.Error):
                for process in [*daemon.children(recursive=True), daemon]:
                    process.terminate()
    return {"tree": tree, "runs": runs, "configurations": results}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _outcome_text(summary: dict) -> str:
    return "; ".join(
        f"exit {o['exit_code']}: " + ", ".join(f"{n} {kind}" for kind, n in o.items() if kind != "exit_code")
        for o in summary["outcomes"]
    )


def peers_markdown(section: dict) -> list[str]:
    configs = section["configurations"]
    cold = next(iter(configs.values()))["wall_s"]["median"]
    lines = [
        f"Peers: this repository's `{section['tree']}`, run our ways and the peers' ways; {section['runs']} runs each, "
        "alternating; median [min–max]. The warm server and pytest-fast's daemon are started before the first "
        "timed run; their process trees count in the memory of the runs they serve.",
        "",
        "| configuration | wall s | outcome | memory MB (summed PSS) | wall / cold |",
        "|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        lines.append(
            f"| {name} | {_range(c['wall_s'])} | {_outcome_text(c)} | {_range(c['pss_mb'], 0)} | "
            f"{c['wall_s']['median'] / cold:.2f} |"
        )
    return lines


SECTIONS = ("core", "unit", "scale", "warm", "peers", "concurrency", "selection")


#: Configurations whose processes are the point; an in-process smoke run leaves them out.
SEPARATE_PROCESSES = ("integration, -n 2 --dist loadgroup",)
SMOKE_SIZES = Sizes(
    sparse_modules=1, classifier_modules=1, unit_modules=1, tests_per_integration_module=2, tests_per_unit_module=1
)
#: The smoke run's int8 comparison: one repeat over the first texts of the dataset.
SMOKE_QUANTIZE = (1, 12)


def main(argv: list[str] | None = None, runner=None, probe=None) -> dict:
    """Run the benchmark. ``runner(root, args)`` and ``probe(name, number)`` replace the fresh
    processes (the self-test's smoke run passes in-process ones, and leaves out -n 2)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of each configuration (default 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one run: checks that it works")
    parser.add_argument(
        "--sections",
        default=None,
        help=f"which sections to run, of {', '.join(SECTIONS)} (default all; core with --smoke); "
        "the others are kept from --output",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "latest.json")
    args = parser.parse_args(argv)
    chosen = args.sections or ("core" if args.smoke else ",".join(SECTIONS))
    sections = [name.strip() for name in chosen.split(",") if name.strip()]
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = SMOKE_SIZES if args.smoke else Sizes()
    runs = 1 if args.smoke else args.runs
    in_process = runner is not None
    unit_runner = runner or functools.partial(run_pytest, env=UNIT_ENV, memory=False)
    runner, probe = runner or run_pytest, probe or run_probe

    results = json.loads(args.output.read_text()) if args.output.exists() and set(sections) != set(SECTIONS) else {}
    results.update(
        {
            "date": datetime.date.today().isoformat(),
            "command": "make bench" if not argv else f"python benchmarks/run.py {' '.join(argv)}",
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "packages": {
                name: importlib.metadata.version(name) for name in PACKAGES + OPTIONAL_PACKAGES if _installed(name)
            },
        }
    )

    def save() -> None:
        """What is measured so far, written after each section: a later section's failure loses only itself."""
        results["markdown"] = markdown(results)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="ml-bench-") as tmp:
        if "core" in sections:
            configs = configurations(Path(tmp), sizes)
            if in_process:
                configs = {name: config for name, config in configs.items() if name not in SEPARATE_PROCESSES}
            results.update(
                {
                    "sizes": asdict(sizes),
                    "runs": runs,
                    "configurations": alternate(configs, runs, runner),
                    "floor": probe("floor", sizes.integration_tests),
                    "quantize": probe("quantize", *(SMOKE_QUANTIZE if args.smoke else (3,))),
                }
            )
            save()
        if "unit" in sections:
            # A fraction of a millisecond a test, in runs of half a second: more pairs than elsewhere.
            results["unit"] = unit_section(Path(tmp), sizes, runs if args.smoke else runs * UNIT_PAIRS, unit_runner)
            save()
        if "scale" in sections:
            results["scale"] = scale_section(Path(tmp), runs)
            save()
        if "warm" in sections:
            results["warm"] = warm_section(Path(tmp), 5 if runs == 3 else runs)
            save()
        if "peers" in sections:
            results["peers"] = peers_section(Path(tmp), runs, PEERS_SMOKE_TREE if args.smoke else PEERS_TREE)
            save()
        if "concurrency" in sections:
            results["concurrency"] = concurrency.section(REPO, Path(tmp), runs, runs=2 if args.smoke else 4)
            save()
        if "selection" in sections:
            results["selection"] = selection.section(runs)
            save()
    save()
    chart.draw(results, args.output.with_suffix(".png"))
    print(results["markdown"])
    return results


if __name__ == "__main__":
    main(sys.argv[1:] or None)
