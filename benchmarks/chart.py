"""The benchmark as a picture: ``benchmarks/results/latest.png``, drawn from ``latest.json``.

Each row is one suite (the generated suite on the embedded models; the seed-scale suite; the
repository's own integration tests cold and warm; the same tree run the peers' ways; runs at once;
selection): wall time per configuration on the left (median, with a bar from the fastest to the
slowest run), and memory on the right (summed PSS over the run's processes, with the largest single
process's peak RSS beside it where every process of the run reports it: not for the peers, whose
forked workers do not) or, where memory is not the point, what the row's numbers mean.
``python benchmarks/chart.py [latest.json]`` redraws it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(configurations: dict) -> tuple[list[str], dict]:
    names = list(configurations)[::-1]  # top to bottom in the order run
    return names, {name: configurations[name] for name in names}


def _panel_wall(axis, configurations: dict, title: str) -> None:
    names, configs = _rows(configurations)
    medians = [configs[n]["wall_s"]["median"] for n in names]
    low = [configs[n]["wall_s"]["median"] - configs[n]["wall_s"]["min"] for n in names]
    high = [configs[n]["wall_s"]["max"] - configs[n]["wall_s"]["median"] for n in names]
    axis.barh(names, medians, xerr=[low, high], color="#4c72b0", capsize=3)
    for y, name in enumerate(names):
        axis.text(configs[name]["wall_s"]["max"], y, f"  {medians[y]:.1f} s", va="center", fontsize=8)
    axis.set_xlabel("wall time, s (median; bar: min–max)")
    axis.set_title(title, fontsize=10, loc="left")
    axis.set_xlim(0, max(c["wall_s"]["max"] for c in configs.values()) * 1.25)


def _panel_memory(axis, configurations: dict, with_rss: bool = True, note: str | None = None) -> None:
    names, configs = _rows(configurations)
    if note is None and not any("pss_mb" in c for c in configs.values()):
        note = "memory not sampled:\nthe warm child runs in the server's process tree"
    if note is not None:
        axis.text(0.5, 0.5, note, ha="center", va="center", fontsize=8)
        axis.axis("off")
        return
    ys = range(len(names))
    pss = [configs[n].get("pss_mb", {}).get("median", 0) for n in names]
    axis.barh([y + 0.2 for y in ys], pss, height=0.4, color="#55a868", label="summed PSS, all processes")
    if with_rss:
        rss = [configs[n]["peak_rss_mb"]["median"] for n in names]
        axis.barh([y - 0.2 for y in ys], rss, height=0.4, color="#c0c0c0", label="peak RSS, largest process")
    axis.set_yticks(list(ys), [""] * len(names))
    axis.set_xlabel("memory, MB (median)")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / len(names)), ncol=2, frameon=False)


def draw(results: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    suites = []  # (configurations, title, with peak RSS, note in place of the memory panel)
    if "configurations" in results:
        sizes = results["sizes"]
        suites.append((results["configurations"], f"Embedded models: {sizes['sparse_modules']} BGE-M3 + "
                       f"{sizes['classifier_modules']} classifier modules, {sizes['unit_modules']} unit modules", True, None))
    if "scale" in results:
        scale = results["scale"]
        suites.append((scale["configurations"], f"Seed scale: bge-m3 architecture, {scale['parameters'] / 1e6:.0f}M "
                       f"parameters, {scale['tests']} tests", True, None))
    if "warm" in results:
        suites.append((results["warm"]["configurations"], "This repository's integration tests: cold and --ml-warm", True, None))
    if "peers" in results:
        suites.append((results["peers"]["configurations"], f"{results['peers']['tree']}: ours and the peers", False, None))
    if "concurrency" in results:
        concurrency = results["concurrency"]
        suites.append((concurrency["configurations"], f"{concurrency['target']}: runs started at once", False,
                       "wall: from the first start to the last\nrun's end; the outcomes are in the table"))
    if "selection" in results:
        suites.append(_selection_rows(results["selection"]))
    if not suites:  # only sections without a picture (unit: its point is pytest's session time, in the table)
        return None
    height = sum(1.2 + 0.45 * len(configs) for configs, *_ in suites)
    figure, axes = pyplot.subplots(
        len(suites), 2, figsize=(13, height), squeeze=False,
        gridspec_kw={"width_ratios": [3, 2], "height_ratios": [len(c) for c, *_ in suites]},
    )
    for (configs, title, with_rss, note), (wall_axis, memory_axis) in zip(suites, axes):
        _panel_wall(wall_axis, configs, title)
        _panel_memory(memory_axis, configs, with_rss, note)
    figure.suptitle(f"ML model fixtures: make bench, {results['date']}, {results['machine']['cpu_count']} CPUs", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def _selection_rows(selection: dict) -> tuple:
    """The record's cost (pytest's session seconds) and the watch loops' save-to-summary seconds as rows."""
    rows = {f"record: {name}": {"wall_s": stat} for name, stat in selection["record_cost"]["configurations"].items()}
    rows |= {f"save to summary: {name}": {"wall_s": stat} for name, stat in selection["watch"].items()}
    edits = selection["edits"]["edits"].values()
    ours, testmon = (sum(len(edit[tool]["missed"]) for edit in edits) for tool in ("ml_affected", "testmon"))
    note = (f"misses over {len(edits)} kinds of edit\n(a failing test not selected):\n"
            f"--ml-affected {ours}, pytest-testmon {testmon}")
    return rows, "Selection: the dependency record's cost, the watch loops", False, note


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    print(draw(json.loads(source.read_text()), source.with_suffix(".png")))
