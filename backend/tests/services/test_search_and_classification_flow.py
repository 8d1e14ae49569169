"""Both services over one database, as the backend uses them, on fake models."""

import pytest

from app.models import Resource
from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService


def test_index_search_and_classify(test_db):
    docs = {
        "cooking": Resource(title="Tomato sauce", content="Simmer the tomato sauce with garlic and basil"),
        "sports": Resource(title="Cup final", content="The goalkeeper saved a penalty in the cup final"),
        "travel": Resource(title="Alps by train", content="The train journey through the Alps offered views"),
    }
    test_db.add_all(docs.values())
    test_db.commit()
    sparse, classifier = SparseEmbeddingService(test_db), MLClassificationService(test_db)
    for label, doc in docs.items():
        sparse.embed_resource(doc.id)
        assert classifier.classify_resource(doc.id).top.label == label
    assert sparse.search("penalty goalkeeper")[0][0] == docs["sports"].id
    assert sparse.search("train through the Alps")[0][0] == docs["travel"].id


def test_mock_services_reject_calls_the_real_api_lacks(mock_sparse_embedding_service, mock_ml_classification_service):
    with pytest.raises(AttributeError):
        mock_sparse_embedding_service.semantic_search("query")
    with pytest.raises(AttributeError):
        mock_ml_classification_service.predict_proba("text")
    with pytest.raises(TypeError):
        mock_ml_classification_service.predict()  # text is required, as in the real signature


def test_mock_services_return_realistic_values(mock_sparse_embedding_service, mock_ml_classification_service):
    assert mock_ml_classification_service.predict("anything").predictions
    assert all(w > 0 for w in mock_sparse_embedding_service.generate_embedding("anything").values())
    assert mock_sparse_embedding_service.generate_embeddings(["a b", "c"]) == [{"a": 0.2, "b": 0.2}, {"c": 0.2}]
