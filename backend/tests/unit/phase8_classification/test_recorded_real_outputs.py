"""Unit tests on a real model's outputs, replayed from the committed cassettes: no model loaded.

The cassettes in backend/tests/cassettes/ were recorded from the embedded models with
``pytest backend/tests/integration --ml-record=once``; the fake models replay them.
"""

import json
from pathlib import Path

import pytest

from app.services.ml_classification_service import MLClassificationService, softmax
from app.services.sparse_embedding_service import SparseEmbeddingService

CASSETTES = Path(__file__).resolve().parents[2] / "cassettes" / "integration"


def recorded(cassette: str, model: str) -> dict:
    return json.loads((CASSETTES / cassette).read_text())["models"][model]["calls"]


def test_held_back_texts_get_the_real_classifier_answers(test_db):
    calls = recorded("phase8_classification/test_classification_integration.json", "backend/taxonomy-classifier")
    text = "Our luggage was lost on the connecting flight to Rome"
    result = MLClassificationService(test_db).predict(text, top_k=6)
    expected = sorted(zip(calls[text], softmax(list(calls[text].values()))), key=lambda pair: -pair[1])
    assert [(p.label, p.confidence) for p in result.predictions] == pytest.approx(expected)
    assert result.top.label == "travel"


def test_keyword_search_ranks_with_the_real_weights(test_db):
    calls = recorded("test_migration_search.json", "BAAI/bge-m3")
    service = SparseEmbeddingService(test_db)
    weights = service.generate_embedding("python programming")
    assert weights == {t: w for t, w in calls["python programming"].items() if t != "[SEP]"}
    assert weights.keys() == {"python", "programming"} and min(weights.values()) > 0
