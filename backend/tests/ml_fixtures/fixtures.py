"""The library's fixtures: the factories that make a declared model's three, and the shared ones.

A root conftest shows every public fixture by name: it imports the shared ones and assigns each
model's, e.g. ``rerank_model_cached = cached_model_fixture(RERANK)``.
"""

from __future__ import annotations

from unittest import mock

import pytest
from sqlalchemy.orm import Session

from ml_fixtures import database
from ml_fixtures.declaration import LoadedModel, ModelSpec
from ml_fixtures.guard import ModelBlocker
from ml_fixtures.options import ModelScope
from ml_fixtures.plugin import ml_models


def cached_fixture_scope(fixture_name: str, config: pytest.Config) -> str:
    """Module scope, or function scope under ``--ml-model-scope=function`` (a load per test)."""
    return "function" if ml_models(config).settings.scope is ModelScope.FUNCTION else "module"


def cached_model_fixture(spec: ModelSpec):
    """``<name>_model_cached``: the real model ``(model, tokenizer, device)`` from the pool."""

    def cached(request: pytest.FixtureRequest) -> LoadedModel:
        return ml_models(request.config).cached(request, spec)

    cached.__doc__ = (
        f"Real {spec.model_name} ``(model, tokenizer, device)`` from the pool; ``(None, None, None)`` if unavailable."
    )
    return pytest.fixture(scope=cached_fixture_scope, name=spec.cached_fixture)(cached)


def model_copy_fixture(spec: ModelSpec):
    """``<name>_model_copy``: a private real model for one test, free to change (a fresh load)."""

    def private_copy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
        return ml_models(request.config).private_copy(request, monkeypatch, spec)

    private_copy.__doc__ = f"A private {spec.model_name} ``(model, tokenizer, device)`` for this test alone, free to change."
    return pytest.fixture(name=spec.copy_fixture)(private_copy)


def mock_service_fixture(spec: ModelSpec):
    """``mock_<name>_service``: an autospecced mock of the model's service with the spec's return values."""

    def service_mock():
        service = mock.create_autospec(spec.service, instance=True)
        spec.mock(service)
        return service

    service_mock.__doc__ = f"A ``{spec.service.__name__}`` mock (autospec) with realistic return values."
    return pytest.fixture(name=spec.mock_fixture)(service_mock)


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    """This directory's rule: "unit" (fakes, real loads fail unless marked) or "integration"."""
    return "unit"


@pytest.fixture(scope="session")
def ml_model_blocker(pytestconfig: pytest.Config) -> ModelBlocker:
    """The guard's state; ``with ml_model_blocker.unblock():`` allows a real load where it is blocked."""
    return ml_models(pytestconfig).blocker


@pytest.fixture(autouse=True)
def mock_ml_models_in_unit_tests(request: pytest.FixtureRequest) -> None:
    """Fake models behind the services, unless the test is marked ``use_real_models``."""
    ml_models(request.config).route(request)


def _run_database(config: pytest.Config) -> database.RunDatabase:
    return database.RunDatabase.of(config, ml_models(config).project.database_metadata)


@pytest.fixture
def test_db_engine(request: pytest.FixtureRequest):
    """The engine of a database of this test's own: a copy of the prepared schema, dropped after the test.

    Commits on it are real and it takes any number of connections, so a second session sees what
    the first committed, as in production. Taking it gives ``test_db`` this database too (as the
    ``fresh_db`` marker does). On SQLite the copy is a file in a temporary directory (sqlite3's
    backup API), on PostgreSQL a database made with ``CREATE DATABASE ... TEMPLATE``.
    """
    with _run_database(request.config).fresh() as engine:
        yield engine


@pytest.fixture
def test_db(request: pytest.FixtureRequest):
    """A database session for one test, on the real schema (``--db``, ``--db-url``: which database).

    By default the test runs inside a transaction rolled back after it, on a database whose schema
    is created once per process; the code's own ``commit()`` and ``rollback()`` work on a SAVEPOINT
    inside it. Mark a test ``@pytest.mark.fresh_db`` (or take ``test_db_engine``) for a database of
    its own instead, where commits are real: for code that opens its own sessions or connections.
    """
    if "test_db_engine" in request.fixturenames or request.node.get_closest_marker(database.FRESH_MARKER):
        with Session(request.getfixturevalue("test_db_engine"), expire_on_commit=False) as session:
            yield session
        return
    with _run_database(request.config).session() as session:
        yield session
