"""Fake models only: real loads fail unless a test is marked ``use_real_models``; no network."""

import pytest


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    return "unit"
