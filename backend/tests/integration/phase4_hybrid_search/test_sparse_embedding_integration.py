"""SparseEmbeddingService on the real (embedded) BGE-M3 layout through FlagEmbedding."""

import shutil

import pytest

from app.ml import SPARSE_EMBEDDING, ModelUnavailableError, resolve_model_path
from app.models import Resource
from app.services.sparse_embedding_service import SparseEmbeddingService

pytestmark = pytest.mark.use_real_models

CORPUS = {
    "python": ("Python programming", "Learn Python programming with small practical examples"),
    "bread": ("Baking bread", "Knead the dough and bake the bread in a hot oven"),
    "stocks": ("Stock markets", "Shares fell as investors sold technology stocks"),
    "alps": ("Alpine railways", "The train journey through the Swiss Alps offered stunning views"),
    "vaccine": ("Vaccines", "The vaccine reduced hospital admissions among elderly patients"),
}


@pytest.fixture
def service(test_db):
    return SparseEmbeddingService(test_db)


@pytest.fixture
def indexed(test_db, service):
    ids = {}
    for key, (title, content) in CORPUS.items():
        resource = Resource(title=title, content=content)
        test_db.add(resource)
        test_db.commit()
        ids[key] = resource.id
        service.embed_resource(resource.id)
    return ids


def test_the_fixture_yields_model_tokenizer_and_device(sparse_embedding_model_cached):
    model, tokenizer, device = sparse_embedding_model_cached
    assert type(model).__name__ == "M3Embedder"  # FlagEmbedding's BGEM3FlagModel
    assert tokenizer is model.tokenizer
    assert device in ("cpu", "cuda")


def test_the_service_uses_the_very_same_model(sparse_embedding_model_cached, service):
    assert service.loaded.model is sparse_embedding_model_cached[0]


def test_weights_are_positive_for_every_real_token(service, sparse_embedding_model_cached):
    tokenizer = sparse_embedding_model_cached[1]
    text = "Sparse lexical retrieval ranks documents by shared tokens"
    weights = service.generate_embedding(text)
    assert set(weights) == set(tokenizer.tokenize(text))
    assert all(weight > 0 for weight in weights.values())
    assert not set(weights) & set(tokenizer.all_special_tokens)


def test_batch_equals_single_calls(service, model_output_tolerance):
    texts = ["The striker scored twice", "", "Preheat the oven and bake the bread for forty minutes"]
    for batched, single in zip(service.generate_embeddings(texts), [service.generate_embedding(t) for t in texts]):
        assert batched.keys() == single.keys()
        assert batched == pytest.approx(single, abs=model_output_tolerance)


@pytest.mark.parametrize(
    "query, expected",
    [("python programming", "python"), ("bake bread", "bread"), ("Swiss Alps train", "alps"), ("vaccine", "vaccine")],
)
def test_keyword_queries_rank_their_document_first(service, indexed, query, expected):
    hits = service.search(query)
    assert hits[0][0] == indexed[expected]
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_a_query_sharing_no_token_finds_nothing(service, indexed):
    assert service.search("zebra") == []


def test_long_text_is_truncated_not_an_error(service):
    weights = service.generate_embedding("python " * 3000 + "needle")
    assert "python" in weights and "needle" not in weights


def test_any_unicode_works(service):
    weights = service.generate_embedding("Crème brûlée au café, 日本語, emoji 😀")
    assert weights and all(w > 0 for w in weights.values())


def test_a_corrupt_model_is_a_model_unavailable_error_naming_the_path(tmp_path, test_db):
    broken = tmp_path / "bge-m3"
    shutil.copytree(resolve_model_path(SPARSE_EMBEDDING), broken)
    (broken / "sparse_linear.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelUnavailableError, match=str(broken)):
        SparseEmbeddingService(test_db, model_path=broken).generate_embedding("text")


def test_a_missing_model_file_is_named(tmp_path, test_db):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailableError, match="sparse_linear.pt"):
        SparseEmbeddingService(test_db, model_path=tmp_path).generate_embedding("text")
