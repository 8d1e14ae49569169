"""Command-line options of the ML fixture library, and the settings read from them."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_fixtures.usage import prune_refusal_at_start

_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


class Choice(enum.StrEnum):
    """An option's closed set of values; :meth:`parse` turns a bad one into a ``UsageError`` listing them."""

    @classmethod
    def parse(cls, value: object, what: str):
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(member.value for member in cls)
            raise pytest.UsageError(f"{what} must be one of {valid}; got {value!r}") from None


class Policy(Choice):
    """A directory's rule, from its ``ml_model_policy`` fixture."""

    #: Fake models; real loads fail unless the test is marked; no network.
    UNIT = "unit"
    #: Fake models unless marked; real ones, from the pool, under the marker or a cached fixture.
    INTEGRATION = "integration"


class ModelScope(Choice):
    SESSION = "session"
    MODULE = "module"
    FUNCTION = "function"


class RecordMode(Choice):
    NONE = "none"
    ONCE = "once"
    REWRITE = "rewrite"
    #: Recompute the entries of the cassettes the tests use on the real models and report the drift; writes nothing.
    VERIFY = "verify"
    #: Verify, then rewrite the entries that drifted beyond tolerance.
    ACCEPT = "accept"
    #: Remove the entries no test used, when the run selected every test and all passed.
    PRUNE = "prune"

    @property
    def records(self) -> bool:
        return self in (RecordMode.ONCE, RecordMode.REWRITE)

    @property
    def verifies(self) -> bool:
        return self in (RecordMode.VERIFY, RecordMode.ACCEPT)

    @property
    def maintains(self) -> bool:
        """Verify, accept and prune replay every cassette as recorded, stale or not (cassettes.py)."""
        return self in (RecordMode.VERIFY, RecordMode.ACCEPT, RecordMode.PRUNE)


class ReplayMode(Choice):
    #: Replay recorded outputs where a cassette holds the text, made-up output elsewhere.
    FALLBACK = "fallback"
    #: Replay only: a text that no current cassette holds fails the test.
    STRICT = "strict"
    #: Never replay: made-up output only.
    NONE = "none"


class Database(Choice):
    """What ``test_db`` runs on when no ``--db-url`` is given."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def parse_size(text: str, what: str = "--ml-model-memory-budget") -> int:
    """``"2GB"`` -> bytes; ``"auto"`` -> half of this machine's memory. ``what`` names the option in errors."""
    if text.strip().lower() == "auto":
        import psutil

        return psutil.virtual_memory().total // 2
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise pytest.UsageError(f"{what}: cannot read {text!r}; use e.g. 512MB, 2GB or auto")
    number, unit = match.groups()
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    return int(float(number) * _UNITS[unit])


def _values(choice: type[Choice]) -> str:
    return "|".join(member.value for member in choice)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ml-models", "ML model fixtures (ML_MODEL_OPTIMIZATION.md, docs/options.md beside the root conftest)")
    group.addoption(
        "--ml-model-scope",
        default=ModelScope.SESSION.value,
        metavar=_values(ModelScope),
        help="how long a real model stays loaded: session (default: shared pool, one load per model "
        "per process), module (released after each test module), function (loaded for every test)",
    )
    group.addoption(
        "--ml-model-memory-budget",
        default="auto",
        metavar="SIZE",
        help="memory the model pool may hold, e.g. 2GB; the least recently used model is evicted "
        "when a new one would not fit (default: auto, half of this machine's memory)",
    )
    group.addoption(
        "--ml-max-memory",
        default=None,
        metavar="SIZE",
        help="the memory that all xdist workers of -n auto may use together, e.g. 8GB; -n auto starts no "
        "more workers than fit in it at the footprint the last run measured (default: the available memory)",
    )
    group.addoption(
        "--ml-model-report",
        default=None,
        metavar="PATH",
        help="write the real-model load report (loads, seconds, memory) as JSON to PATH",
    )
    group.addoption(
        "--ml-quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: load real models with dynamic int8 quantization of their linear layers (CPU only)",
    )
    group.addoption(
        "--ml-model-cache-dir",
        default=None,
        metavar="DIR",
        help="where the project builds and keeps its test models across runs "
        "(default: the project's cache directory, e.g. $ML_MODEL_CACHE_DIR)",
    )
    group.addoption(
        "--ml-record",
        default=RecordMode.NONE.value,
        metavar=_values(RecordMode),
        help="record the real models' calls into cassettes, one per test module: once (where missing or "
        "stale), rewrite (all); the fake models replay them in every run (default: none). Maintenance: verify "
        "(recompute the entries of the cassettes the selected tests use on the real models, report the drift, write "
        "nothing; drift fails the run), accept (verify, then rewrite only the entries that drifted), prune (remove "
        "the entries no test used; only in a run of every test that all pass)",
    )
    group.addoption(
        "--ml-drift-report",
        action="append",
        default=[],
        metavar="PATH",
        help="with --ml-record=verify|accept: write the drift report to PATH, as Markdown if PATH ends in .md, "
        "else as JSON (may be given twice); the Markdown is also appended to $GITHUB_STEP_SUMMARY when that is set",
    )
    group.addoption(
        "--ml-cassette-usage",
        default=None,
        metavar="PATH",
        help="write which cassette entries each test used, and what the run selected, as JSON to PATH: "
        "the shards of a split run each write one, and `python -m ml_fixtures.unused` merges them",
    )
    group.addoption(
        "--ml-replay",
        default=ReplayMode.FALLBACK.value,
        metavar=_values(ReplayMode),
        help="what fake models answer: fallback (default: a recorded output where a cassette holds the text, "
        "made-up output elsewhere), strict (recorded outputs only: an unrecorded text fails the test), "
        "none (made-up output only)",
    )
    group.addoption(
        "--ml-cassette-dir",
        default=None,
        metavar="DIR",
        help="where the cassettes are (default: cassettes/ beside the root conftest)",
    )
    group.addoption(
        "--ml-warm",
        action="store_true",
        help="run this session in a child of a warm server that keeps the project's ML libraries imported "
        "(started on first use; same output and exit code as a cold run); with -n, its xdist workers are "
        "children of that server",
    )
    group.addoption(
        "--ml-affected",
        nargs="?",
        const="last",
        default=None,
        metavar="REF",
        help="run only the tests whose recorded dependencies (code, data files, models, cassette entries) changed "
        "since the last run, plus tests with no record and tests that failed last time; with REF, also what "
        "changed since that git revision (every run with pytest's cache records the dependencies)",
    )
    group.addoption(
        "--ml-watch",
        action="store_true",
        help="watch the repository and, on each save, run the affected tests in a warm child (implies --ml-warm "
        "and --ml-affected); a newer save cancels the run in progress; Ctrl-C ends it with the last run's exit code",
    )
    group.addoption(
        "--ml-warm-stop",
        action="store_true",
        help="stop the warm servers of --ml-warm that this interpreter started (every identity's), if any run, and exit",
    )
    database = parser.getgroup("ml-database", "test_db's database (docs/database.md beside the root conftest)")
    database.addoption(
        "--db",
        default=Database.SQLITE.value,
        metavar=_values(Database),
        help="sqlite (default: in memory) or postgresql (a throwaway server for the run, started with pg_ctl); "
        "either way the schema is created once and each test runs in a transaction rolled back after it "
        "(@pytest.mark.fresh_db: a database of the test's own)",
    )
    database.addoption(
        "--db-url",
        default=None,
        metavar="URL",
        help="run test_db on this server instead, e.g. postgresql://user@host/name (default: $TEST_DATABASE_URL); "
        "PostgreSQL gets a database of its own for the run, test_<name>, dropped after it",
    )
    group.addoption(
        "--ml-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of real models (default: auto, CUDA where available, else CPU)",
    )


def take_back_a_path(config: pytest.Config) -> None:
    """``--ml-affected PATH``: argparse gives the option an optional value, so it took the test path
    that followed as a revision. A value written as a separate word that names a file or directory
    is given back to the paths (``--ml-affected=REF`` or a word that is no path is a revision)."""
    value = config.option.ml_affected
    if value in (None, "last") or "--ml-affected" not in map(str, config.invocation_params.args):
        return
    if (config.invocation_params.dir / value.partition("::")[0]).exists():
        config.option.ml_affected = "last"
        config.args.append(value)


@dataclass(frozen=True)
class Settings:
    """Everything the options decide, read once per run (kept in ``config.stash``)."""

    scope: ModelScope
    memory_budget: int
    #: ``--ml-max-memory`` in bytes (``-n auto`` reads it before the settings exist; parsed here to fail early).
    max_memory: int | None
    report_path: str | None
    device: str | None
    #: None (fp16 on CUDA, fp32 on CPU) or "int8".
    dtype: str | None
    record: RecordMode
    replay: ReplayMode
    cassette_dir: Path
    #: ``--ml-affected``: None, "last" (since the last run) or a git revision.
    affected: str | None = None
    #: ``--ml-drift-report`` paths: Markdown where the name ends in ``.md``, else JSON.
    drift_reports: tuple[Path, ...] = ()
    usage_path: Path | None = None

    def fingerprint(self, config: pytest.Config) -> str:
        """The settings that change what a test sees (the dependency record's context)."""
        database = config.getoption("db_url") or config.getoption("db")
        return f"device={self.device or 'auto'} dtype={self.dtype or 'default'} replay={self.replay} db={database}"

    @classmethod
    def from_config(cls, config: pytest.Config, default_cassette_dir: Path) -> Settings:
        device, max_memory = config.getoption("ml_device"), config.getoption("ml_max_memory")
        record = RecordMode.parse(config.getoption("ml_record"), "--ml-record")
        drift_reports = config.getoption("ml_drift_report")
        if drift_reports and not record.verifies:
            raise pytest.UsageError(f"--ml-drift-report needs --ml-record=verify or accept (got --ml-record={record.value})")
        if record is RecordMode.PRUNE:
            refusal = prune_refusal_at_start(config)
            if refusal:
                raise pytest.UsageError(refusal)
        usage = config.getoption("ml_cassette_usage")
        return cls(
            scope=ModelScope.parse(config.getoption("ml_model_scope"), "--ml-model-scope"),
            memory_budget=parse_size(config.getoption("ml_model_memory_budget")),
            max_memory=None if max_memory is None else parse_size(max_memory, "--ml-max-memory"),
            report_path=config.getoption("ml_model_report"),
            device=None if device == "auto" else device,
            dtype=None if config.getoption("ml_quantize") == "none" else config.getoption("ml_quantize"),
            record=record,
            replay=ReplayMode.parse(config.getoption("ml_replay"), "--ml-replay"),
            cassette_dir=Path(config.getoption("ml_cassette_dir") or default_cassette_dir),
            affected=config.getoption("ml_affected") or ("last" if config.getoption("ml_watch") else None),
            drift_reports=tuple(Path(path) for path in drift_reports),
            usage_path=None if usage is None else Path(usage),
        )
