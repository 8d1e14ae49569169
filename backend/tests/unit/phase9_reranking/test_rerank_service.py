"""RerankService's own logic, and sparse search with reranking, on the fake reranker behind the seam."""

import json
from pathlib import Path

import pytest

from app.ml.embedded import ranking_cases
from app.models import Resource
from app.services.rerank_service import RerankService
from app.services.sparse_embedding_service import SparseEmbeddingService
from fake_models import FakeReranker

TEXTS = [
    "Shares fell as investors sold technology stocks",
    "The glacier is retreating faster every summer",
    "Knead the dough and bake the bread in a hot oven",
]


@pytest.fixture
def service(test_db):
    return RerankService(test_db)


def test_construction_loads_nothing(service):
    assert service._loaded is None


def test_the_seam_gives_the_fake_reranker(service):
    assert isinstance(service.loaded.model, FakeReranker)


def test_indices_and_scores_best_first(service):
    ranked = service.rerank("bake bread at home", TEXTS)
    assert sorted(i for i, _ in ranked) == [0, 1, 2]
    assert ranked[0][0] == 2
    assert [score for _, score in ranked] == sorted((score for _, score in ranked), reverse=True)
    assert all(isinstance(score, float) for _, score in ranked)


def test_top_k_keeps_the_best(service):
    assert service.rerank("glacier melting", TEXTS, top_k=1) == service.rerank("glacier melting", TEXTS)[:1]
    assert len(service.rerank("glacier", TEXTS, top_k=10)) == 3


def test_no_texts_is_an_empty_ranking(service):
    assert service.rerank("anything", []) == []


def test_equal_scores_keep_the_texts_order(service, monkeypatch):
    monkeypatch.setattr(RerankService, "_scores", lambda self, query, texts: [1.0] * len(texts))
    assert service.rerank("q", ["a", "b", "c"]) == [(0, 1.0), (1, 1.0), (2, 1.0)]


@pytest.mark.parametrize(
    "query, texts, top_k, error",
    [
        (None, TEXTS, None, TypeError),
        (b"bytes", TEXTS, None, TypeError),
        ("q", "one text", None, TypeError),
        ("q", ("a", "b"), None, TypeError),
        ("q", ["a", 3], None, TypeError),
        ("q", TEXTS, 0, ValueError),
        ("q", TEXTS, -1, ValueError),
        ("q", TEXTS, 1.5, TypeError),
        ("q", TEXTS, True, TypeError),
    ],
)
def test_bad_input_is_a_clear_error(service, query, texts, top_k, error):
    with pytest.raises(error):
        service.rerank(query, texts, top_k=top_k)


def test_search_can_rerank_its_candidates(test_db):
    resources = [Resource(title=f"Doc {i}", content=text) for i, text in enumerate(TEXTS)]
    resources.append(Resource(title="Bread notes", content="the bread the bread the bread"))
    test_db.add_all(resources)
    test_db.commit()
    search = SparseEmbeddingService(test_db)
    for resource in resources:
        search.embed_resource(resource.id)
    query = "bake bread in the oven"
    candidates = [resource_id for resource_id, _ in search.search(query, limit=50)]
    texts = [test_db.get(Resource, resource_id).text for resource_id in candidates]
    expected = [(candidates[i], score) for i, score in RerankService(test_db).rerank(query, texts, top_k=2)]
    reranked = search.search(query, limit=2, rerank=True)
    assert reranked == expected and len(reranked) == 2
    assert reranked[0][0] == resources[2].id
    assert isinstance(search.reranker, RerankService)


def test_search_rerank_must_be_a_bool(test_db):
    with pytest.raises(TypeError):
        SparseEmbeddingService(test_db).search("bread", rerank="yes")


def test_the_mock_service_is_autospecced(mock_rerank_service):
    assert mock_rerank_service.rerank("q", ["a", "b", "c"], top_k=2) == [(0, 5.0), (1, 4.0)]
    with pytest.raises(AttributeError):
        mock_rerank_service.score("q", ["a"])
    with pytest.raises(TypeError):
        mock_rerank_service.rerank("q")


def test_held_back_queries_get_the_real_rerankers_recorded_scores(service):
    """Recorded from the embedded reranker by ``pytest backend/tests/integration --ml-record=once``."""
    cassette = Path(__file__).resolve().parents[2] / "cassettes/integration/phase9_reranking/test_rerank_integration.json"
    calls = json.loads(cassette.read_text())["models"]["BAAI/bge-reranker-v2-m3"]["calls"]
    query, candidates, relevant = ranking_cases()[0]
    ranked = service.rerank(query, candidates)
    assert [score for _, score in sorted(ranked)] == [calls[json.dumps([query, text])] for text in candidates]
    assert ranked[0][0] == relevant
