"""Public fixtures for tests of the backend and its ML models.

Read ML_MODEL_OPTIMIZATION.md beside this file (the guide; docs/ holds its reference pages). In short:

* ``<model>_model_cached`` (``sparse_embedding``, ``ml_classification``, ``rerank``) yield
  ``(model, tokenizer, device)`` of a real model, loaded once into a shared pool; a test that
  changes it fails ("modified the shared model"); ``<model>_model_copy`` give a private one;
  ``mock_<model>_service`` an autospecced service mock;
* every test gets fake models behind the services (``mock_ml_models_in_unit_tests``)
  unless it is marked ``@pytest.mark.use_real_models`` or uses a cached fixture;
* each directory's conftest sets its rule by overriding ``ml_model_policy``;
* ``ml_model_blocker.unblock()`` lets a fixture load a real model where the guard blocks it.

The models are declared once each in ``ml_models.py``; the machinery (pool, loaders, fakes,
guard, load report, cassettes) lives in ``ml_fixtures/``, which imports nothing of ``app``.
"""

from __future__ import annotations

from ml_fixtures.fixtures import (  # noqa: F401 (fixtures: importing them defines them here)
    cached_model_fixture,
    ml_model_blocker,
    ml_model_policy,
    mock_ml_models_in_unit_tests,
    mock_service_fixture,
    model_copy_fixture,
    test_db,
    test_db_engine,
)
from ml_models import CLASSIFIER, PROJECT, RERANK, SPARSE

pytest_plugins = ("ml_fixtures.plugin", "pytester")


def pytest_ml_project(config):
    """This repository's models and files (``ml_models.py``)."""
    return PROJECT


sparse_embedding_model_cached = cached_model_fixture(SPARSE)
sparse_embedding_model_copy = model_copy_fixture(SPARSE)
mock_sparse_embedding_service = mock_service_fixture(SPARSE)

ml_classification_model_cached = cached_model_fixture(CLASSIFIER)
ml_classification_model_copy = model_copy_fixture(CLASSIFIER)
mock_ml_classification_service = mock_service_fixture(CLASSIFIER)

rerank_model_cached = cached_model_fixture(RERANK)
rerank_model_copy = model_copy_fixture(RERANK)
mock_rerank_service = mock_service_fixture(RERANK)
