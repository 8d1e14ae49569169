"""The hook a project implements to declare its models to the library."""

from __future__ import annotations

import pytest


@pytest.hookspec(firstresult=True)
def pytest_ml_project(config: pytest.Config):
    """Return the project's :class:`~ml_fixtures.declaration.Project` (its models, cache, trees).

    Implement it in the root conftest; without one the library declares no models.
    """
