"""RerankService on the real cross-encoder (FlagEmbedding's FlagReranker) fine-tuned from the packaged MiniLM."""

import pytest

from app.ml import ModelUnavailableError
from app.ml.embedded import ranking_cases
from app.models import Resource
from app.services.rerank_service import RerankService
from app.services.sparse_embedding_service import SparseEmbeddingService

pytestmark = pytest.mark.use_real_models


@pytest.fixture
def service(test_db):
    return RerankService(test_db)


def test_the_fixture_yields_model_tokenizer_and_device(rerank_model_cached):
    model, tokenizer, device = rerank_model_cached
    assert type(model).__name__ == "BaseReranker"  # FlagEmbedding's FlagReranker
    assert tokenizer is model.tokenizer
    assert device in ("cpu", "cuda")


def test_the_service_uses_the_very_same_model(rerank_model_cached, service):
    assert service.loaded.model is rerank_model_cached.model


def test_held_back_queries_rank_their_relevant_text_first(service):
    cases = ranking_cases()
    first = sum(service.rerank(query, candidates, top_k=1)[0][0] == relevant for query, candidates, relevant in cases)
    assert first / len(cases) >= 0.8, f"{first}/{len(cases)} ranked first"


def test_batch_equals_single_calls(service, rerank_score_tolerance):
    texts = ["Interest rates rose again", "The striker scored twice", "Bake the bread for forty minutes"]
    batched = dict(service.rerank("central bank policy", texts))
    single = {i: service.rerank("central bank policy", [text])[0][1] for i, text in enumerate(texts)}
    assert batched == pytest.approx(single, abs=rerank_score_tolerance)


def test_long_and_unicode_texts_work(service):
    ranked = service.rerank("football match", ["football " * 2000, "Crème brûlée, 日本語 😀"])
    assert [i for i, _ in ranked] == [0, 1]


def test_sparse_search_reranks_its_candidates(test_db, service):
    texts = {
        "bank": "The central bank raised interest rates to fight inflation",
        "river": "We walked along the river bank at dawn",
        "match": "The striker scored twice in the cup final",
    }
    resources = {key: Resource(title=key.title(), content=text) for key, text in texts.items()}
    test_db.add_all(resources.values())
    test_db.commit()
    search = SparseEmbeddingService(test_db, reranker=service)
    for resource in resources.values():
        search.embed_resource(resource.id)
    hits = search.search("bank interest rates and monetary policy", limit=2, rerank=True)
    assert hits[0][0] == resources["bank"].id and len(hits) == 2
    assert hits[0][1] > hits[1][1]


def test_a_missing_model_is_a_model_unavailable_error_naming_the_path(tmp_path, test_db):
    with pytest.raises(ModelUnavailableError, match=str(tmp_path / "nowhere")):
        RerankService(test_db, model_path=tmp_path / "nowhere").rerank("q", ["text"])
