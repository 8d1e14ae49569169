"""The benchmark's concurrency section: several pytest runs of one module started at once, cold and
through ``--ml-warm`` (whose server shares the CPUs among its runs), against one run alone.

Every configuration starts its runs together and waits for all of them; the wall is from the
first start to the last end. The warm server is started (untimed) before the first timed run.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = "backend/tests/integration/phase4_hybrid_search"


def run_at_once(root: Path, args: list[str], count: int, env: dict[str, str]) -> dict:
    """``count`` pytest runs of ``args`` started together: the wall of all, each run's wall and outcome."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    options = {"cwd": root, "env": {**os.environ, **env}, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    start = time.perf_counter()
    processes = [subprocess.Popen(command, **options) for _ in range(count)]
    runs = []
    for process in processes:
        output, _ = process.communicate()
        runs.append({"wall_s": time.perf_counter() - start, "exit_code": process.returncode, "summary": _summary(output)})
    return {"wall_s": max(run["wall_s"] for run in runs), "runs": runs}


def _summary(output: str) -> str:
    """pytest's summary line without its time ("15 passed"), or the run's last line."""
    lines = output.strip().splitlines() or ["(no output)"]
    line = next((line for line in reversed(lines) if re.search(r" in [0-9.]+s", line)), lines[-1])
    return re.sub(r" in [0-9.]+s.*", "", line).strip("= ")


def configurations(runs: int) -> dict[str, tuple[list[str], int, dict[str, str]]]:
    passive = {"OMP_WAIT_POLICY": "passive"}
    return {
        "1 cold run": ([TARGET], 1, {}),
        f"{runs} cold runs at once": ([TARGET], runs, {}),
        "1 --ml-warm run": (["--ml-warm", TARGET], 1, {}),
        f"{runs} --ml-warm runs at once": (["--ml-warm", TARGET], runs, {}),
        f"{runs} --ml-warm runs at once, OMP_WAIT_POLICY=passive": (["--ml-warm", TARGET], runs, passive),
    }


def section(repo: Path, workdir: Path, repeats: int, runs: int = 4) -> dict:
    """Each configuration ``repeats`` times, alternating; the warm servers started beforehand."""
    env = {"ML_WARM_DIR": str(workdir / "warm-concurrency"), "PYTHONDONTWRITEBYTECODE": ""}
    configs = configurations(runs)
    for args, _, own in configs.values():
        if "--ml-warm" in args:
            run_at_once(repo, ["--collect-only", *args], 1, {**env, **own})
    raw: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        for repeat in range(repeats):
            for name, (args, count, own) in configs.items():
                raw[name].append(run_at_once(repo, args, count, {**env, **own}))
                print(f"run {repeat + 1}/{repeats} concurrency {name}: {raw[name][-1]['wall_s']:.1f} s", file=sys.stderr)
    finally:
        stop = [sys.executable, "-m", "pytest", "--ml-warm-stop"]  # every identity's server there (OMP_WAIT_POLICY's too)
        subprocess.run(stop, cwd=repo, env={**os.environ, **env}, capture_output=True)
    summaries = {name: _summarize(results) for name, results in raw.items()}
    return {"target": TARGET, "runs_at_once": runs, "repeats": repeats, "configurations": summaries}


def _summarize(results: list[dict]) -> dict:
    walls = [result["wall_s"] for result in results]
    each = [run["wall_s"] for result in results for run in result["runs"]]
    outcomes = sorted({(run["exit_code"], run["summary"]) for result in results for run in result["runs"]})
    return {
        "wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
        "each_run_s": {"median": statistics.median(each), "min": min(each), "max": max(each)},
        "outcomes": [{"exit_code": code, "summary": summary} for code, summary in outcomes],
        "results": results,
    }


def markdown(section: dict) -> list[str]:
    configs = section["configurations"]
    n = section["runs_at_once"]
    cold = configs[f"{n} cold runs at once"]["wall_s"]["median"]
    lines = [
        f"Concurrency: `{section['target']}` run by {n} pytest processes started at once, cold and through `--ml-warm`, "
        f"against one run alone; {section['repeats']} repeats each, alternating; median [min–max] of the wall from the "
        "first start to the last end.",
        "",
        "| configuration | wall s | each run s | outcomes | wall / cold at once |",
        "|---|---|---|---|---|",
    ]
    for name, c in configs.items():
        outcome = "; ".join(f"exit {o['exit_code']}: {o['summary']}" for o in c["outcomes"])
        lines.append(
            f"| {name} | {_range(c['wall_s'])} | {_range(c['each_run_s'])} | {outcome} | {c['wall_s']['median'] / cold:.2f} |"
        )
    return lines


def _range(stat: dict) -> str:
    return f"{stat['median']:.1f} [{stat['min']:.1f}–{stat['max']:.1f}]"
