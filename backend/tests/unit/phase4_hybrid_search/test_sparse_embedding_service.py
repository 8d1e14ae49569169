"""SparseEmbeddingService's own logic, on the fake BGE-M3 behind its loading seam."""

import pytest
from sqlalchemy import select

from app.models import Resource, ResourceSparseEmbedding
from app.services.common import ResourceNotFoundError
from app.services.sparse_embedding_service import SparseEmbeddingService
from fake_models import FakeBGEM3Model


@pytest.fixture
def service(test_db):
    return SparseEmbeddingService(test_db)


@pytest.fixture
def resources(test_db):
    rows = [
        Resource(title="Python programming", content="Learn Python programming with small examples"),
        Resource(title="Baking bread", content="Knead the dough and bake the bread in a hot oven"),
        Resource(title="Stock markets", content="Shares fell as investors sold technology stocks"),
    ]
    test_db.add_all(rows)
    test_db.commit()
    return rows


def test_construction_loads_nothing(service):
    assert service._loaded is None


def test_the_seam_gives_the_fake_model(service):
    assert isinstance(service.loaded.model, FakeBGEM3Model)


def test_weights_are_the_texts_own_content_words_and_positive(service):
    weights = service.generate_embedding("Sparse retrieval with lexical weights")
    assert set(weights) == {"sparse", "retrieval", "lexical", "weights"}  # "with" weighs nothing
    assert all(weight > 0 for weight in weights.values())


def test_a_rare_word_outweighs_a_common_one_and_function_words_weigh_nothing(service):
    weights = service.generate_embedding("The glacier of the north and the new station")
    assert not {"the", "of", "and"} & set(weights)
    assert weights["glacier"] > weights["new"] > 0


def test_a_rare_query_word_beats_a_stopword_stuffed_document(service, test_db):
    from app.models import Resource

    topical = Resource(title="Glacier", content="The glacier is retreating")
    stuffed = Resource(title="Notes", content="the of the and the of the in the of the north")
    test_db.add_all([topical, stuffed])
    test_db.commit()
    service.embed_resource(topical.id)
    service.embed_resource(stuffed.id)
    assert service.search("the glacier of the north")[0][0] == topical.id


def test_special_tokens_are_removed(service):
    assert not set(service.generate_embedding("hello world")) & {"[CLS]", "[SEP]", "[PAD]"}


def test_batch_equals_single_calls(service):
    texts = ["first text", "", "a second, longer text", "   "]
    assert service.generate_embeddings(texts) == [service.generate_embedding(t) for t in texts]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_gives_empty_dict(service, text):
    assert service.generate_embedding(text) == {}


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ["a list"]])
def test_non_string_text_is_a_type_error(service, bad):
    with pytest.raises(TypeError):
        service.generate_embedding(bad)


def test_a_non_string_inside_a_batch_is_a_type_error(service):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        service.generate_embeddings(["ok", None])


def test_search_ranks_keyword_matches_first(service, resources):
    for resource in resources:
        service.embed_resource(resource.id)
    hits = service.search("python programming")
    assert hits[0][0] == resources[0].id
    assert all(score > 0 for _, score in hits)
    assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)


def test_search_respects_limit_and_rejects_bad_limits(service, resources):
    for resource in resources:
        service.embed_resource(resource.id)
    assert len(service.search("the", limit=1)) <= 1
    with pytest.raises(ValueError):
        service.search("the", limit=0)


def test_search_with_empty_query_finds_nothing(service, resources):
    service.embed_resource(resources[0].id)
    assert service.search("   ") == []


def test_embed_resource_stores_and_replaces_the_vector(service, resources, test_db):
    first = service.embed_resource(resources[0].id)
    stored = test_db.get(ResourceSparseEmbedding, resources[0].id)
    assert stored.weights == first and stored.model_name == "BAAI/bge-m3"
    resources[0].content = "Completely different words now"
    test_db.commit()
    second = service.embed_resource(resources[0].id)
    assert test_db.get(ResourceSparseEmbedding, resources[0].id).weights == second != first


def test_unknown_resource_is_a_lookup_error(service):
    with pytest.raises(LookupError):
        service.embed_resource(999)
    assert issubclass(ResourceNotFoundError, LookupError)


def test_a_failure_while_writing_leaves_the_database_as_it_was(service, resources, test_db, monkeypatch):
    service.embed_resource(resources[0].id)
    before = {row.resource_id: dict(row.weights) for row in test_db.scalars(select(ResourceSparseEmbedding))}

    def fail_on_flush(*args, **kwargs):
        raise RuntimeError("disk full")

    resources[0].content = "new words that would change the vector"
    test_db.commit()
    monkeypatch.setattr(test_db, "flush", fail_on_flush)
    with pytest.raises(RuntimeError, match="disk full"):
        service.embed_resource(resources[0].id)
    monkeypatch.undo()
    after = {row.resource_id: dict(row.weights) for row in test_db.scalars(select(ResourceSparseEmbedding))}
    assert after == before


def test_unicode_and_long_texts_work(service):
    assert service.generate_embedding("Ünïcödé café naïve 日本語 text")
    assert service.generate_embedding("word " * 5000)

