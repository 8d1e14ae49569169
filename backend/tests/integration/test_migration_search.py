"""The migration guide's integration example (backend/tests/docs/migration.md), before and after."""

import pytest

from app.models import Resource
from app.services.sparse_embedding_service import SparseEmbeddingService


def _index(test_db, service):
    python = Resource(title="Python programming", content="Learn Python programming with examples")
    bread = Resource(title="Baking bread", content="Knead the dough and bake the bread")
    test_db.add_all([python, bread])
    test_db.commit()
    service.embed_resource(python.id)
    service.embed_resource(bread.id)
    return python


# Before: unchanged code. It used to load BGE-M3 in every test; it now runs on the fake model.
def test_search_before(test_db):
    service = SparseEmbeddingService(test_db)
    python = _index(test_db, service)
    assert service.search("python programming")[0][0] == python.id


# After: marked, and served by the pooled real model (loaded once per run).
@pytest.mark.use_real_models
def test_search_after(sparse_embedding_model_cached, test_db, trained_sparse_model):
    model, tokenizer, device = sparse_embedding_model_cached
    service = SparseEmbeddingService(test_db)
    python = _index(test_db, service)
    assert service.loaded.model is model
    assert service.search("python programming")[0][0] == python.id
