"""The load report: every real model load, which test caused it, its time and memory."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil

from ml_fixtures.declaration import LoadedModel


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def cuda_allocated() -> int | None:
    """``torch.cuda.memory_allocated()``; 0 while torch is not imported (nothing can be on the GPU)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class LoadRecord:
    model: str
    test: str | None
    #: The loading test's ``ml_model_policy``: "integration" or "unit".
    policy: str | None
    seconds: float
    rss_before_mb: float
    rss_after_mb: float
    worker: str = "main"


@dataclass
class LoadReport:
    """Every real load of a run (per xdist worker; merged on the controller), printed and written as JSON."""

    worker: str = "main"
    records: list[LoadRecord] = field(default_factory=list)
    peak_rss_by_worker: dict[str, float] = field(default_factory=dict)
    evictions: list[str] = field(default_factory=list)
    stale_cassettes: list[str] = field(default_factory=list)
    cassettes_written: list[str] = field(default_factory=list)
    #: ``torch.cuda.memory_allocated()`` before the first load and after the last release.
    cuda: dict[str, int | None] = field(default_factory=dict)
    #: How the run's torch threads went (a warm child's share of the CPUs), per process.
    threads: list[str] = field(default_factory=list)

    def timed_load(self, key: object, load: Callable[[], LoadedModel], test: str | None, policy: object) -> LoadedModel:
        """``load()``, recorded with its time and memory, under the test that caused it and that test's directory rule."""
        self.cuda.setdefault("allocated_before_first_load", cuda_allocated())
        before, start = _rss_mb(), time.perf_counter()
        loaded = load()
        seconds = time.perf_counter() - start
        policy = None if policy is None else str(policy)  # plain str: xdist sends it
        self.records.append(LoadRecord(str(key), test, policy, seconds, before, _rss_mb(), self.worker))
        return loaded

    def evicted(self, key: object, test: str | None) -> None:
        self.evictions.append(f"{key} (for {test})")

    def finish(self) -> None:
        """Called after the pool's last release."""
        self.peak_rss_by_worker[self.worker] = peak_rss_mb()
        if self.records:
            self.cuda["allocated_after_release"] = cuda_allocated()

    def to_dict(self) -> dict:
        per_model: dict[str, dict] = {}
        for record in self.records:
            entry = per_model.setdefault(record.model, {"loads": 0, "seconds": 0.0})
            entry["loads"] += 1
            entry["seconds"] = round(entry["seconds"] + record.seconds, 3)
        return {
            "loads": len(self.records),
            "load_seconds": round(sum(r.seconds for r in self.records), 3),
            "peak_rss_mb": round(max(self.peak_rss_by_worker.values(), default=peak_rss_mb()), 1),
            "per_model": per_model,
            "outside_integration": [asdict(r) for r in self.records if r.policy != "integration"],
            "records": [asdict(r) for r in self.records],
            "evictions": self.evictions,
            "stale_cassettes": self.stale_cassettes,
            "cassettes_written": self.cassettes_written,
            "cuda": self.cuda,
            "peak_rss_mb_by_worker": self.peak_rss_by_worker,
            "threads": self.threads,
        }

    def merge(self, data: dict) -> None:
        """Add a worker's report (pytest-xdist sends it to the controller)."""
        self.records += [LoadRecord(**r) for r in data["records"]]
        self.peak_rss_by_worker.update(data["peak_rss_mb_by_worker"])
        self.evictions += data["evictions"]
        self.stale_cassettes = sorted(set(self.stale_cassettes) | set(data["stale_cassettes"]))
        self.cassettes_written += data["cassettes_written"]
        worker = next(iter(data["peak_rss_mb_by_worker"]))
        self.cuda.update({f"{worker}:{key}": value for key, value in data["cuda"].items()})
        self.threads += [f"[{worker}] {line}" for line in data.get("threads", [])]

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    def summary_lines(self) -> list[str]:
        data = self.to_dict()
        lines = [
            f"real model loads: {data['loads']}, {data['load_seconds']:.2f} s loading, "
            f"peak memory {data['peak_rss_mb']:.0f} MB, {len(self.evictions)} evictions"
        ]
        if data["per_model"]:
            width = max(len(m) for m in data["per_model"])
            lines.append(f"  {'model'.ljust(width)}  loads  seconds")
            for model, entry in sorted(data["per_model"].items()):
                lines.append(f"  {model.ljust(width)}  {entry['loads']:5d}  {entry['seconds']:7.2f}")
        for record in data["outside_integration"]:
            lines.append(f"  outside the integration tree: {record['test']} loaded {record['model']}")
        if self.cuda and all(value is not None for value in self.cuda.values()):
            lines.append("  CUDA memory allocated: " + ", ".join(f"{k} {v} B" for k, v in sorted(self.cuda.items())))
        lines += [f"  {line}" for line in self.threads]
        for cassette in self.cassettes_written:
            lines.append(f"  cassette recorded: {cassette}")
        for cassette in self.stale_cassettes:
            lines.append(f"  stale cassette (not replayed; re-record with --ml-record=once): {cassette}")
        return lines
