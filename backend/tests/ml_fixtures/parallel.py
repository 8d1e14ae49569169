"""Parallel runs that fit the machine: each xdist worker's thread budget, and an ``-n auto`` that counts memory.

* **Thread budget.** Under ``-n N`` each worker runs torch on ``max(1, CPUs // N)`` threads
  (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``torch.set_num_threads``): N workers that each
  start a thread per core only fight over the cores. A user's own ``OMP_NUM_THREADS`` or
  ``MKL_NUM_THREADS`` is left alone. The controller hands the number to each worker in its
  ``workerinput``; the worker applies it in its ``pytest_configure``, before torch is imported in a
  fresh worker, through ``torch.set_num_threads`` where torch is imported already (a worker forked
  from the warm server).
* **Memory-aware ``-n auto``** (``pytest_xdist_auto_num_workers``): the smaller of pytest-xdist's
  own CPU count and the number of workers that memory holds: available memory (or
  ``--ml-max-memory``, if smaller) over one worker's footprint. The footprint is the largest worker
  PSS that the last xdist run of the same test paths measured (each worker at the end of its
  session, models still loaded; kept in pytest's cache); before any such run, the declared models'
  weight files plus :data:`IMPORT_MARGIN`.

* **Other runs.** A cold run's header says when other pytest runs of this project are using the
  CPUs now: separate processes each size torch's thread pool to every core, and fight. Runs
  through ``--ml-warm`` share the cores (``warm/threads.py``).

These are printed in the session header.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_fixtures.declaration import Project
from ml_fixtures.hookspecs import project_of
from ml_fixtures.options import parse_size

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: One worker before any model is loaded: the interpreter with pytest, torch, transformers and
#: FlagEmbedding imported measures about 480 MB of PSS on this machine; rounded up for the tests' own data.
IMPORT_MARGIN = 600 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: In pytest's cache: {test paths of the run: {"pss": bytes of the largest worker, "workers": N}}.
FOOTPRINT_KEY = "ml-models/worker-footprint"
THREADS_INPUT = "ml_torch_threads"
PSS_OUTPUT = "ml_worker_pss"
auto_workers_key = pytest.StashKey["AutoWorkers"]()


def worker_id(config: pytest.Config) -> str | None:
    """This xdist worker's id ("gw0"), or None outside a worker.

    From the worker's own ``workerinput``, not ``PYTEST_XDIST_WORKER``: that variable reaches every
    process a worker's tests start, and a pytest run among them is not a worker.
    """
    return getattr(config, "workerinput", {}).get("workerid")


def size_text(size: float) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.0f} MB"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _paths_key(config: pytest.Config) -> str:
    return " ".join(config.args)


@dataclass(frozen=True)
class ThreadBudget:
    """The torch threads of each of ``workers`` xdist workers on ``cpus`` CPUs."""

    workers: int
    cpus: int
    #: The user's own thread variables: when there are any, nothing is changed.
    user_set: tuple[tuple[str, str], ...] = ()

    @property
    def threads(self) -> int | None:
        return None if self.user_set else max(1, self.cpus // self.workers)

    def line(self) -> str:
        if self.user_set:
            given = ", ".join(f"{name}={value}" for name, value in self.user_set)
            return f"ml-models: {self.workers} xdist workers; torch threads left as the environment sets them ({given})"
        return (
            f"ml-models: {self.workers} xdist workers × {self.threads} torch thread{'s' if self.threads > 1 else ''} "
            f"each (OMP_NUM_THREADS=MKL_NUM_THREADS={self.threads}; {self.cpus} CPUs)"
        )

    @classmethod
    def for_controller(cls, config: pytest.Config) -> ThreadBudget | None:
        """The budget of this run's workers, or None for a run that starts none."""
        if not config.pluginmanager.hasplugin("xdist") or config.getoption("collectonly"):
            return None
        if config.getoption("dist") == "no" or not config.getoption("tx"):
            return None
        from xdist.workermanage import parse_tx_spec_config

        user_set = tuple((name, os.environ[name]) for name in THREAD_VARIABLES if name in os.environ)
        return cls(len(parse_tx_spec_config(config)), usable_cpus(), user_set)


def other_runs(rootpath: Path) -> list[tuple[int, str]]:
    """Other pytest runs of the project at ``rootpath`` now: (pid, command) of each process whose
    command runs pytest in ``rootpath`` or below, other than this one, its ancestors (a test that
    started this run) and its descendants (its own workers)."""
    import psutil

    me = psutil.Process()
    related = {me.pid, *(p.pid for p in me.parents()), *(p.pid for p in me.children(recursive=True))}
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = process.info["cmdline"] or []
        if process.info["pid"] in related or not _runs_pytest(command):
            continue
        try:
            cwd = Path(process.cwd())
        except psutil.Error:  # gone, or not ours to look at
            continue
        if cwd == rootpath or rootpath in cwd.parents:
            found.append((process.info["pid"], " ".join(command)))
    return found


def _runs_pytest(command: list[str]) -> bool:
    """``pytest ...``, ``python -m pytest ...``, ``python .../bin/pytest ...``."""
    head = command[:3]
    return any(Path(arg).name in ("pytest", "py.test") for arg in head) or head[1:3] == ["-m", "pytest"] or "-mpytest" in head


def other_runs_line(rootpath: Path) -> str | None:
    runs = other_runs(rootpath)
    if not runs:
        return None
    shown = "; ".join(f"pid {pid}: {command[:60]}" for pid, command in runs[:3])
    return (
        f"ml-models: {len(runs)} other pytest run{'s' if len(runs) > 1 else ''} of this project "
        f"{'are' if len(runs) > 1 else 'is'} using the CPUs ({shown}); each sizes torch's threads to every core, "
        "and they compete. Runs with --ml-warm share the cores instead"
    )


def apply_threads(config: pytest.Config, threads: int) -> None:
    """In a worker: set its thread budget, undone when its session ends."""
    patch = pytest.MonkeyPatch()
    config.add_cleanup(patch.undo)
    for name in THREAD_VARIABLES:
        patch.setenv(name, str(threads))
    torch = sys.modules.get("torch")
    if torch is not None:  # imported before the variables could act: a worker forked from the warm server
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        config.add_cleanup(lambda: torch.set_num_threads(previous))


def declared_weights(project: Project) -> tuple[int, list[str]]:
    """Bytes of the declared models' weight files, and the models not built or found yet.

    Nothing is built or imported for it: a model that is not on disk yet (``locate()`` is None) counts as unknown.
    """
    total, unknown = 0, []
    for spec in project.models:
        directory = spec.locate()
        if directory is None:
            unknown.append(spec.model_name)
            continue
        total += sum(f.stat().st_size for f in directory.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    return total, unknown


def measured_footprint(config: pytest.Config) -> int | None:
    """The largest worker PSS that the last xdist run of these test paths measured, if any."""
    if not config.pluginmanager.has_plugin("cacheprovider") or config.getoption("cacheclear"):
        return None
    # config.cache appears only at pytest_configure, after xdist has asked for the number of workers.
    cache = pytest.Cache.for_config(config, _ispytest=True)
    record = cache.get(FOOTPRINT_KEY, {}).get(_paths_key(config))
    return record["pss"] if record else None


@dataclass(frozen=True)
class AutoWorkers:
    """What ``-n auto`` decided, and why."""

    cpus: int
    #: Bytes the workers may use together, and where the figure comes from.
    memory: int
    memory_source: str
    footprint: int
    footprint_source: str

    @property
    def memory_workers(self) -> int:
        return self.memory // self.footprint

    @property
    def workers(self) -> int:
        return max(1, min(self.cpus, self.memory_workers))

    def line(self) -> str:
        each = f"~{size_text(self.footprint)} each ({self.footprint_source})"
        plural = "s" if self.workers > 1 else ""
        if self.memory_workers < self.cpus:
            return (
                f"ml-models: -n auto → {self.workers} worker{plural} (limited by memory: {size_text(self.memory)} "
                f"{self.memory_source} at {each}; CPUs would allow {self.cpus})"
            )
        return (
            f"ml-models: -n auto → {self.workers} worker{plural} (limited by CPUs: {self.cpus}; "
            f"memory would allow {self.memory_workers} at {each})"
        )

    @classmethod
    def decide(cls, config: pytest.Config, cpus: int, project: Project) -> AutoWorkers:
        import psutil

        available = psutil.virtual_memory().available
        memory, memory_source = available, "available"
        cap = config.getoption("ml_max_memory")
        limit = None if cap is None else parse_size(cap, "--ml-max-memory")
        if limit is not None and limit < available:
            memory, memory_source = limit, f"allowed by --ml-max-memory={cap}"
        measured = measured_footprint(config)
        if measured is not None:
            return cls(cpus, memory, memory_source, measured, "measured by the last run")
        weights, unknown = declared_weights(project)
        source = f"estimated: model weights {size_text(weights)} + {size_text(IMPORT_MARGIN)} for the interpreter and libraries"
        if unknown:
            source += f"; not built yet: {', '.join(unknown)}"
        return cls(cpus, memory, memory_source, weights + IMPORT_MARGIN, source)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: as many workers as the CPUs and the memory allow.

    A module-level hook, not a method of :class:`ParallelRuns`: xdist asks in ``pytest_cmdline_main``,
    before ``pytest_configure`` registers the plugin object.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # the user's own number, which xdist reads
    from xdist.plugin import pytest_xdist_auto_num_workers as xdist_cpu_count

    decision = AutoWorkers.decide(config, cpus=xdist_cpu_count(config), project=project_of(config))
    config.stash[auto_workers_key] = decision
    return decision.workers


class ParallelRuns:
    """The run state of parallel runs, on the controller (budget, workers' footprints) and in each worker."""

    def __init__(self, config: pytest.Config, warm_threads: bool = False):
        #: In a warm child the server's board shares the cores (``warm/threads.py``).
        self.warm_threads = warm_threads
        self.budget = None if hasattr(config, "workerinput") else ThreadBudget.for_controller(config)
        self.worker_pss: list[int] = []
        threads = getattr(config, "workerinput", {}).get(THREADS_INPUT)
        if threads:  # a worker forked from the warm server: its ceiling (warm/threads.py takes a share under it)
            apply_threads(config, threads)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        lines = [config.stash[auto_workers_key].line()] if auto_workers_key in config.stash else []
        lines += [self.budget.line()] if self.budget else []
        warm = self.warm_threads or config.pluginmanager.has_plugin("ml-warm-workers")  # the server shares the cores
        others = None if warm else other_runs_line(config.rootpath)
        return lines + ([others] if others else [])

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        if self.budget and self.budget.threads:
            node.workerinput[THREADS_INPUT] = self.budget.threads

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        pss = getattr(node, "workeroutput", {}).get(PSS_OUTPUT)
        if pss:
            self.worker_pss.append(pss)

    @pytest.hookimpl(tryfirst=True)  # in a worker: before the pool lets its models go
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        config = session.config
        if hasattr(config, "workeroutput"):
            import psutil

            config.workeroutput[PSS_OUTPUT] = psutil.Process().memory_full_info().pss
        elif self.worker_pss and getattr(config, "cache", None) is not None:
            records = config.cache.get(FOOTPRINT_KEY, {})
            records[_paths_key(config)] = {"pss": max(self.worker_pss), "workers": len(self.worker_pss)}
            config.cache.set(FOOTPRINT_KEY, records)
