"""The hook a project implements to declare its models to the library, and its one caller."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_fixtures.declaration import Project

_project_key = pytest.StashKey[Project]()


@pytest.hookspec(firstresult=True)
def pytest_ml_project(config: pytest.Config):
    """Return the project's :class:`~ml_fixtures.declaration.Project` (its models, cache, trees).

    Implement it in the root conftest; without one the library declares no models.
    """


def project_of(config: pytest.Config) -> Project:
    """The project's declaration (``pytest_ml_project``, asked once per run), or an empty one: no models."""
    if _project_key not in config.stash:
        project = config.hook.pytest_ml_project(config=config)
        if project is None:
            project = Project(models=(), tests_dir=config.rootpath, cache_dir=lambda: Path.home() / ".cache" / "ml-fixtures")
        elif not isinstance(project, Project):
            raise pytest.UsageError(f"pytest_ml_project must return an ml_fixtures.declaration.Project, not {project!r}")
        config.stash[_project_key] = project
    return config.stash[_project_key]
