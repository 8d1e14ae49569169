"""Public fixtures for tests of the backend and its ML models.

Read ML_MODEL_OPTIMIZATION.md beside this file. In short:

* ``sparse_embedding_model_cached`` / ``ml_classification_model_cached`` yield
  ``(model, tokenizer, device)`` of a real model, loaded once into a shared pool; a test that
  changes it fails ("modified the shared model"); ``*_model_copy`` give a private one;
* every test gets fake models behind the services (``mock_ml_models_in_unit_tests``)
  unless it is marked ``@pytest.mark.use_real_models`` or uses a cached fixture;
* each directory's conftest sets its rule by overriding ``ml_model_policy``;
* ``ml_model_blocker.unblock()`` lets a fixture load a real model where the guard blocks it.

The machinery (pool, loaders, fakes, guard, load report, cassettes) lives in ``ml_fixtures/``.
"""

from __future__ import annotations

from unittest import mock

import pytest
from app.services.ml_classification_service import ClassificationResult, LabelPrediction, MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService
from ml_fixtures import database, plugin
from ml_fixtures.catalog import CLASSIFIER, SPARSE
from ml_fixtures.guard import ModelBlocker

pytest_plugins = ("ml_fixtures.plugin", "pytester")


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    """This directory's rule: "unit" (fakes, real loads fail unless marked) or "integration"."""
    return "unit"


@pytest.fixture(scope=plugin.cached_fixture_scope)
def sparse_embedding_model_cached(request, ml_model_policy):
    """Real BGE-M3 ``(model, tokenizer, device)`` from the pool; ``(None, None, None)`` if unavailable."""
    return plugin.cached_model(request, SPARSE, ml_model_policy)


@pytest.fixture(scope=plugin.cached_fixture_scope)
def ml_classification_model_cached(request, ml_model_policy):
    """Real classifier ``(model, tokenizer, device)`` from the pool; ``(None, None, None)`` if unavailable."""
    return plugin.cached_model(request, CLASSIFIER, ml_model_policy)


@pytest.fixture
def sparse_embedding_model_copy(request, monkeypatch, ml_model_policy):
    """A private BGE-M3 ``(model, tokenizer, device)`` for this test alone, free to change (a fresh load)."""
    return plugin.private_copy(request, monkeypatch, SPARSE, ml_model_policy)


@pytest.fixture
def ml_classification_model_copy(request, monkeypatch, ml_model_policy):
    """A private classifier ``(model, tokenizer, device)`` for this test alone, free to change (a fresh load)."""
    return plugin.private_copy(request, monkeypatch, CLASSIFIER, ml_model_policy)


@pytest.fixture(scope="session")
def ml_model_blocker(pytestconfig) -> ModelBlocker:
    """The guard's state; ``with ml_model_blocker.unblock():`` allows a real load where it is blocked."""
    return pytestconfig.stash[plugin.blocker_key]


@pytest.fixture(autouse=True)
def mock_ml_models_in_unit_tests(request, monkeypatch, ml_model_policy):
    """Fake models behind the services, unless the test is marked ``use_real_models``."""
    plugin.route_model_loads(request, monkeypatch, ml_model_policy)


@pytest.fixture
def mock_sparse_embedding_service():
    """A ``SparseEmbeddingService`` mock (autospec) with realistic return values."""
    service = mock.create_autospec(SparseEmbeddingService, instance=True)
    service.model_name = SparseEmbeddingService.model_name
    service.generate_embedding.return_value = {"machine": 0.31, "learning": 0.27, "model": 0.18}
    service.generate_embeddings.side_effect = lambda texts: [
        {token: 0.2 for token in text.lower().split()} for text in texts
    ]
    service.embed_resource.return_value = {"machine": 0.31, "learning": 0.27}
    service.search.return_value = [(1, 0.42), (3, 0.17)]
    return service


@pytest.fixture
def mock_ml_classification_service():
    """An ``MLClassificationService`` mock (autospec) returning a realistic ``ClassificationResult``."""
    result = ClassificationResult(
        predictions=[
            LabelPrediction("technology", 0.82),
            LabelPrediction("finance", 0.11),
            LabelPrediction("health", 0.04),
        ],
        model_version="mock-classifier",
    )
    service = mock.create_autospec(MLClassificationService, instance=True)
    service.predict.return_value = result
    service.predict_batch.side_effect = lambda texts, top_k=3: [result] * len(texts)
    service.classify_resource.return_value = result
    service.train.return_value = "mock-classifier"
    return service


@pytest.fixture(scope="session")
def test_db_engine(pytestconfig):
    """The run's database engine (schema created once); None means a fresh in-memory SQLite per test."""
    with database.engine_for_run(pytestconfig) as engine:
        yield engine


@pytest.fixture
def test_db(test_db_engine):
    """A database session per test: fresh in-memory SQLite, or (``--db``/``--db-url``) a rolled-back transaction."""
    with database.session_for_test(test_db_engine) as session:
        yield session
