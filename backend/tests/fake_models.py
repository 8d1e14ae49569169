"""This repository's fake models: the interfaces the services use, deterministic answers, no ML library.

``FakeBGEM3Model`` answers ``encode`` like FlagEmbedding's ``BGEM3FlagModel``: lexical weights for
the text's own tokens, keyed by token id, from the term-importance table that the embedded BGE-M3
is fitted to (``app.ml.term_importance``): rare words weigh most, function words and punctuation
get 0 and are left out, as a trained BGE-M3 does. ``FakeSequenceClassifier`` answers like a
transformers sequence classifier: logits over the real label set of the shipped dataset, favouring
the label whose training texts share the most words with the input. ``FakeReranker`` answers
``compute_score`` like FlagEmbedding's ``FlagReranker``: a relevance logit per ``(query, passage)``
pair, from the term importance of the query's words that the passage shares.

Each replays a real model's recorded output for an input that a cassette holds (``replay.get(key)``).
``integration/test_fakes_match_real_interfaces.py`` checks them against the real classes.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from app.ml import term_importance
from app.ml.embedded import load_dataset
from ml_fixtures.fakes import FIRST_ID, FakeTokenizer, stable_fraction


class FakeBGEM3Model:
    """``BGEM3FlagModel.encode`` with the term-importance table's weights; weight-0 tokens left out."""

    def __init__(self, tokenizer: FakeTokenizer | None = None, replay=None) -> None:
        self.tokenizer = tokenizer or FakeTokenizer()
        self.replay = replay or {}

    def encode(
        self,
        sentences,
        batch_size=None,
        max_length=None,
        return_dense=None,
        return_sparse=None,
        return_colbert_vecs=None,
        **kwargs,
    ) -> dict:
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)
        lexical = [self._weights(text, ids) for text, ids in zip(texts, encoded["input_ids"])]
        return {
            "dense_vecs": None,
            "lexical_weights": (lexical[0] if single else lexical) if return_sparse else None,
            "colbert_vecs": None,
        }

    def _weights(self, text: str, ids: list[int]) -> dict[str, float]:
        recorded = self.replay.get(text)
        if recorded is not None:
            return {str(self.tokenizer.convert_tokens_to_ids(t)): w for t, w in recorded.items()}
        special, table = set(self.tokenizer.all_special_ids), term_importance.shipped()
        weights = {str(i): table.weight(self.tokenizer.convert_ids_to_tokens(i)) for i in ids if i not in special}
        return {token_id: weight for token_id, weight in weights.items() if weight > 0}


@functools.cache
def _label_vocabulary() -> dict[str, frozenset[str]]:
    words: dict[str, set[str]] = {}
    for row in load_dataset():
        if row["split"] == "train":
            words.setdefault(row["label"], set()).update(w for w in term_importance.words(row["text"]) if len(w) > 3)
    return {label: frozenset(ws) for label, ws in sorted(words.items())}


class FakeSequenceClassifier:
    """A sequence classifier over the shipped label set: logits from word overlap, ties broken stably."""

    def __init__(self, tokenizer: FakeTokenizer, replay=None) -> None:
        labels = list(_label_vocabulary())
        self.tokenizer = tokenizer
        #: text -> {label: logit}, recorded from the real classifier.
        self.replay = replay or {}
        self.config = SimpleNamespace(
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            model_version="fake-classifier",
        )

    def eval(self) -> FakeSequenceClassifier:
        return self

    def to(self, device: str) -> FakeSequenceClassifier:
        return self

    def __call__(self, input_ids, attention_mask=None, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=[self._logits(ids) for ids in input_ids])

    def _logits(self, ids: list[int]) -> list[float]:
        vocabulary = _label_vocabulary()
        recorded = self.replay.get(self.tokenizer.text_of(ids))
        if recorded is not None and set(recorded) == set(vocabulary):
            return [recorded[label] for label in vocabulary]
        words = set(self.tokenizer.convert_ids_to_tokens([i for i in ids if i >= FIRST_ID]))
        return [2.0 * len(words & vocabulary[label]) + stable_fraction(label + " ".join(sorted(words))) for label in vocabulary]


class FakeReranker:
    """``FlagReranker.compute_score``: a logit per pair, rising with the term importance of the query words the
    passage shares (about -5 for none, above 0 for a rare shared word, as a trained reranker spreads them)."""

    def __init__(self, tokenizer: FakeTokenizer, replay=None) -> None:
        self.tokenizer = tokenizer
        #: (query, passage) -> logit, recorded from the real reranker.
        self.replay = replay or {}

    def compute_score(self, sentence_pairs, batch_size=None, max_length=None, normalize=None, **kwargs) -> list[float]:
        pairs = [sentence_pairs] if isinstance(sentence_pairs[0], str) else sentence_pairs
        encoded = self.tokenizer([tuple(pair) for pair in pairs], truncation=True, max_length=max_length)
        return [self._score(ids) for ids in encoded["input_ids"]]

    def _score(self, ids: list[int]) -> float:
        pair = self.tokenizer.text_of(ids)
        recorded = self.replay.get(pair)
        if recorded is not None:
            return recorded
        query, passage = (set(term_importance.words(text)) for text in pair)
        table = term_importance.shipped()
        shared = sum(table.weight(word) for word in query & passage)
        return 20.0 * shared - 5.0 + stable_fraction(" ".join(pair))


def fake_sparse_embedding_model(replay=None) -> tuple:
    tokenizer = FakeTokenizer()
    return FakeBGEM3Model(tokenizer, replay), tokenizer, "cpu"


def fake_classification_model(replay=None) -> tuple:
    tokenizer = FakeTokenizer()
    return FakeSequenceClassifier(tokenizer, replay), tokenizer, "cpu"


def fake_rerank_model(replay=None) -> tuple:
    tokenizer = FakeTokenizer()
    return FakeReranker(tokenizer, replay), tokenizer, "cpu"
