"""The fake models answer the calls the services make with the real classes' signatures."""

import inspect

import pytest

from fake_models import FakeBGEM3Model, FakeReranker
from ml_fixtures.fakes import FakeTokenizer

pytestmark = pytest.mark.use_real_models


def _parameters(function):
    return [name for name in inspect.signature(function).parameters if name not in ("self", "kwargs", "args")]


def test_fake_bge_m3_encode_takes_the_real_parameters():
    from FlagEmbedding import BGEM3FlagModel

    real = _parameters(BGEM3FlagModel.encode)
    assert _parameters(FakeBGEM3Model.encode) == real[: len(_parameters(FakeBGEM3Model.encode))]


@pytest.mark.parametrize("name", ["tokenize", "convert_tokens_to_ids", "convert_ids_to_tokens", "__call__"])
def test_fake_tokenizer_methods_exist_on_the_real_tokenizer(sparse_embedding_model_cached, name):
    tokenizer = sparse_embedding_model_cached.tokenizer
    assert callable(getattr(tokenizer, name))
    assert hasattr(FakeTokenizer, name)


def test_fake_and_real_tokenizers_agree_on_special_tokens(sparse_embedding_model_cached):
    assert set(FakeTokenizer.all_special_tokens) == set(sparse_embedding_model_cached.tokenizer.all_special_tokens)


def test_fake_reranker_compute_score_takes_parameters_the_real_one_takes():
    from FlagEmbedding import FlagReranker

    assert set(_parameters(FakeReranker.compute_score)) <= set(_parameters(FlagReranker.compute_score_single_gpu))


def test_fake_tokenizer_takes_pairs_as_the_real_one_does(rerank_model_cached):
    real, fake = rerank_model_cached.tokenizer, FakeTokenizer()
    for tokenizer in (real, fake):
        single = tokenizer("what is a glacier", "A glacier is a river of ice")
        batch = tokenizer([("what is a glacier", "A glacier is a river of ice")])
        assert batch["input_ids"][0] == single["input_ids"]
        assert set(single["token_type_ids"]) == {0, 1}
