"""Fake models by default; real ones for tests marked ``use_real_models`` or using a cached fixture."""

import pytest


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    return "integration"


@pytest.fixture(scope="session")
def model_output_tolerance(pytestconfig) -> float:
    """Absolute tolerance between a batched and a single call: int8 quantizes activations per batch."""
    return 1e-2 if pytestconfig.getoption("ml_quantize") == "int8" else 1e-4
