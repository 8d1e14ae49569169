"""Command-line options of the ML fixture library, and the settings read from them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

SCOPES = ("session", "module", "function")
_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_size(text: str) -> int:
    """``"2GB"`` -> bytes; ``"auto"`` -> half of this machine's memory."""
    if text.strip().lower() == "auto":
        import psutil

        return psutil.virtual_memory().total // 2
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise pytest.UsageError(f"--ml-model-memory-budget: cannot read {text!r}; use e.g. 512MB, 2GB or auto")
    number, unit = match.groups()
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    return int(float(number) * _UNITS[unit])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ml-models", "ML model fixtures (backend/tests/ML_MODEL_OPTIMIZATION.md)")
    group.addoption(
        "--ml-model-scope",
        choices=SCOPES,
        default="session",
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
        help="where the embedded test models are built and kept across runs "
        "(default: $ML_MODEL_CACHE_DIR, else ~/.cache/backend-ml-models)",
    )
    group.addoption(
        "--ml-record",
        choices=("none", "once", "rewrite"),
        default="none",
        help="record the real models' calls into cassettes, one per test module: once (where missing or "
        "stale), rewrite (all); the fake models replay them in every run (default: none)",
    )
    group.addoption(
        "--ml-cassette-dir",
        default=str(Path(__file__).resolve().parents[1] / "cassettes"),
        metavar="DIR",
        help="where the cassettes are (default: backend/tests/cassettes)",
    )
    group.addoption(
        "--ml-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of real models (default: auto, CUDA where available, else CPU)",
    )


@dataclass(frozen=True)
class Settings:
    scope: str
    memory_budget: int
    report_path: str | None
    device: str | None
    #: None (fp16 on CUDA, fp32 on CPU) or "int8".
    dtype: str | None
    record: str
    cassette_dir: Path

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        device = config.getoption("ml_device")
        return cls(
            scope=config.getoption("ml_model_scope"),
            memory_budget=parse_size(config.getoption("ml_model_memory_budget")),
            report_path=config.getoption("ml_model_report"),
            device=None if device == "auto" else device,
            dtype=None if config.getoption("ml_quantize") == "none" else config.getoption("ml_quantize"),
            record=config.getoption("ml_record"),
            cassette_dir=Path(config.getoption("ml_cassette_dir")),
        )
