"""SparseEmbeddingService on a real BGE-M3 through FlagEmbedding.

Every assertion here holds for the production BAAI/bge-m3 too: term weights are a subset of the
text's tokens, content words outweigh function words, the rare word decides a ranking. Tests
that need trained weights take ``trained_sparse_model`` and skip on the seed-scale model.
"""

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


def test_weights_are_a_subset_of_the_texts_tokens_without_special_ones(service, sparse_embedding_model_cached):
    tokenizer = sparse_embedding_model_cached.tokenizer
    text = "Sparse lexical retrieval ranks documents by shared tokens"
    weights = service.generate_embedding(text)
    assert weights and set(weights) <= set(tokenizer.tokenize(text))
    assert not set(weights) & set(tokenizer.all_special_tokens)
    assert all(weight > 0 for weight in weights.values())  # zero weights are dropped


def test_content_words_outweigh_function_words(service, trained_sparse_model):
    weights = service.generate_embedding("The glacier of the north is melting into the sea")
    function = [weights.get(word, 0.0) for word in ("the", "of", "is", "into")]
    content = [weights.get(word, 0.0) for word in ("glacier", "north", "melting", "sea")]
    assert max(function) < min(content)
    assert sum(function) / len(function) < 0.25 * sum(content) / len(content)


def test_a_rare_query_word_beats_a_stopword_stuffed_document(service, test_db, trained_sparse_model):
    topical = Resource(title="Glaciers", content="The glacier is retreating faster every summer")
    stuffed = Resource(title="Notes", content="the of the and the of the in the of the to the north")
    test_db.add_all([topical, stuffed])
    test_db.commit()
    for resource in (topical, stuffed):
        service.embed_resource(resource.id)
    assert service.search("the glacier of the north")[0][0] == topical.id


def test_batch_equals_single_calls(service, model_output_tolerance):
    texts = ["The striker scored twice", "", "Preheat the oven and bake the bread for forty minutes"]
    for batched, single in zip(service.generate_embeddings(texts), [service.generate_embedding(t) for t in texts]):
        assert batched.keys() == single.keys()
        assert batched == pytest.approx(single, abs=model_output_tolerance)


@pytest.mark.parametrize(
    "query, expected",
    [("python programming", "python"), ("bake bread", "bread"), ("Swiss Alps train", "alps"), ("vaccine", "vaccine")],
)
def test_keyword_queries_rank_their_document_first(service, indexed, query, expected, trained_sparse_model):
    hits = service.search(query)
    assert hits[0][0] == indexed[expected]
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_a_query_sharing_no_token_finds_nothing(service, indexed):
    assert service.search("zebra") == []


def test_long_text_is_truncated_not_an_error(service, trained_sparse_model):
    weights = service.generate_embedding("python " * 3000 + "needle")
    assert "python" in weights and "needle" not in weights


def test_any_unicode_works(service, trained_sparse_model):
    weights = service.generate_embedding("Crème brûlée au café, 日本語, emoji 😀")
    assert weights and all(w > 0 for w in weights.values())


def test_a_corrupt_model_is_a_model_unavailable_error_naming_the_path(tmp_path, test_db):
    broken = tmp_path / "bge-m3"
    broken.mkdir()
    for file in resolve_model_path(SPARSE_EMBEDDING).iterdir():  # links: the model may be 2.2 GB
        (broken / file.name).symlink_to(file)
    (broken / "sparse_linear.pt").unlink()
    (broken / "sparse_linear.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelUnavailableError, match=str(broken)):
        SparseEmbeddingService(test_db, model_path=broken).generate_embedding("text")


def test_a_missing_model_file_is_named(tmp_path, test_db):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailableError, match="sparse_linear.pt"):
        SparseEmbeddingService(test_db, model_path=tmp_path).generate_embedding("text")
