"""Deterministic fake models with the interfaces the services use, and no ML library.

``FakeBGEM3Model`` answers ``encode`` like FlagEmbedding's ``BGEM3FlagModel``: lexical
weights for the text's own tokens, keyed by token id, from the term-importance table that the
embedded BGE-M3 is fitted to (``app.ml.term_importance``): rare words weigh most, function words
and punctuation get 0 and are left out, as a trained BGE-M3 does. ``FakeSequenceClassifier``
answers like a transformers sequence classifier: logits over the real label set of the shipped
dataset, favouring the label whose training texts share the most words with the input.

Both replay a real model's recorded output for a text that a cassette holds (``replay.get(text)``:
a dict, or ``cassettes.Replay``, which can also refuse unrecorded texts).
``integration/test_fakes_match_real_interfaces.py`` checks them against the real classes.
"""

from __future__ import annotations

import functools
import zlib
from types import SimpleNamespace

from app.ml import LoadedModel, term_importance
from app.ml.embedded import load_dataset

_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def _stable_fraction(token: str) -> float:
    return zlib.crc32(token.encode()) / 2**32


class FakeBatchEncoding(dict):
    """A tokenizer's output: a dict of id lists that can be moved to a device (a no-op)."""

    def to(self, device: str) -> FakeBatchEncoding:
        return self


class FakeTokenizer:
    """Lower-cased word tokenizer with stable hashed ids: the subset of a HF tokenizer in use."""

    model_max_length = 512
    all_special_tokens = list(_SPECIAL)
    all_special_ids = list(_SPECIAL.values())

    def __init__(self) -> None:
        self._tokens_by_id = {i: t for t, i in _SPECIAL.items()}
        self._texts_by_ids: dict[tuple[int, ...], str] = {}

    def tokenize(self, text: str) -> list[str]:
        return term_importance.words(text)

    def convert_tokens_to_ids(self, token: str) -> int:
        token_id = _SPECIAL[token] if token in _SPECIAL else 1000 + zlib.crc32(token.encode()) % 1_000_000
        self._tokens_by_id[token_id] = token
        return token_id

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tokens_by_id.get(ids, "[UNK]")
        return [self.convert_ids_to_tokens(i) for i in ids]

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors=None, **kwargs):
        single = isinstance(texts, str)
        limit = (max_length or self.model_max_length) - 2
        rows = []
        for text in [texts] if single else texts:
            tokens = self.tokenize(text)[:limit] if truncation else self.tokenize(text)
            rows.append([_SPECIAL["[CLS]"], *map(self.convert_tokens_to_ids, tokens), _SPECIAL["[SEP]"]])
            self._texts_by_ids[tuple(rows[-1])] = text
        width = max(map(len, rows))
        ids = [row + [0] * (width - len(row)) for row in rows]
        mask = [[1] * len(row) + [0] * (width - len(row)) for row in rows]
        encoding = FakeBatchEncoding(input_ids=ids, attention_mask=mask)
        return FakeBatchEncoding({k: v[0] for k, v in encoding.items()}) if single else encoding

    def text_of(self, ids) -> str | None:
        """The text this tokenizer turned into ``ids`` (padding ignored), if it did."""
        ids = list(ids)
        while ids and ids[-1] == _SPECIAL["[PAD]"]:
            ids.pop()
        return self._texts_by_ids.get(tuple(ids))


class FakeBGEM3Model:
    """``BGEM3FlagModel.encode`` with the term-importance table's weights; weight-0 tokens left out."""

    def __init__(self, tokenizer: FakeTokenizer | None = None, replay: dict | None = None) -> None:
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

    def __init__(self, tokenizer: FakeTokenizer, replay: dict | None = None) -> None:
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
        words = set(self.tokenizer.convert_ids_to_tokens([i for i in ids if i >= 1000]))
        return [2.0 * len(words & vocabulary[label]) + _stable_fraction(label + " ".join(sorted(words))) for label in vocabulary]


def fake_sparse_embedding_model(replay: dict | None = None) -> LoadedModel:
    tokenizer = FakeTokenizer()
    return LoadedModel(FakeBGEM3Model(tokenizer, replay), tokenizer, "cpu")


def fake_classification_model(replay: dict | None = None) -> LoadedModel:
    tokenizer = FakeTokenizer()
    return LoadedModel(FakeSequenceClassifier(tokenizer, replay), tokenizer, "cpu")
