"""Fake models by default; real ones for tests marked ``use_real_models`` or using a cached fixture."""

import pytest


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    return "integration"
