"""Building blocks for a project's fake models: a tokenizer with the subset of a Hugging Face
tokenizer's interface that services use, texts and text pairs alike, and no ML library.

A project's fake models (``fake_models.py`` here) hold one and answer from it; ``text_of(ids)``
gives back the text (or pair) that became ``ids``, so a fake can replay a recorded output.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
#: Ids of ordinary tokens start here, above every special id.
FIRST_ID = 1000
WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, in order."""
    return WORD.findall(text.lower())


def stable_fraction(token: str) -> float:
    """A number in [0, 1) fixed by ``token``: deterministic tie-breaks across runs and machines."""
    return zlib.crc32(token.encode()) / 2**32


class FakeBatchEncoding(dict):
    """A tokenizer's output: a dict of id lists that can be moved to a device (a no-op)."""

    def to(self, device: str) -> FakeBatchEncoding:
        return self


class FakeTokenizer:
    """Lower-cased word tokenizer with stable hashed ids, for texts and ``(text, text_pair)`` pairs."""

    model_max_length = 512
    padding_side = "right"
    truncation_side = "right"
    all_special_tokens = list(SPECIAL)
    all_special_ids = list(SPECIAL.values())

    def __init__(self) -> None:
        self._tokens_by_id = {i: t for t, i in SPECIAL.items()}
        self._texts_by_ids: dict[tuple[int, ...], str | tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._tokens_by_id)

    def tokenize(self, text: str) -> list[str]:
        return words(text)

    def convert_tokens_to_ids(self, token: str) -> int:
        token_id = SPECIAL[token] if token in SPECIAL else FIRST_ID + zlib.crc32(token.encode()) % 1_000_000
        self._tokens_by_id[token_id] = token
        return token_id

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tokens_by_id.get(ids, "[UNK]")
        return [self.convert_ids_to_tokens(i) for i in ids]

    def __call__(
        self,
        text,
        text_pair=None,
        padding=True,
        truncation=True,
        max_length=None,
        return_tensors=None,
        add_special_tokens=True,
        **kwargs,
    ) -> FakeBatchEncoding:
        """Like a Hugging Face tokenizer: a text, a list of texts, a list of ``(a, b)`` pairs, or texts and ``text_pair``."""
        single = isinstance(text, str)
        firsts = [text] if single else list(text)
        if text_pair is not None:
            pairs = list(zip(firsts, [text_pair] if isinstance(text_pair, str) else text_pair))
        elif firsts and not isinstance(firsts[0], str):
            pairs = [tuple(pair) for pair in firsts]
        else:
            pairs = [(first, None) for first in firsts]
        paired = any(second is not None for _, second in pairs)
        limit = (max_length or self.model_max_length) - (3 if paired else 2)
        rows, types = [], []
        for first, second in pairs:
            ids, segment = self._encode(first, second, limit if truncation else None, add_special_tokens)
            rows.append(ids)
            types.append(segment)
            self._texts_by_ids[tuple(ids)] = first if second is None else (first, second)
        width = max(map(len, rows)) if padding and rows else 0
        encoding = FakeBatchEncoding(
            input_ids=[row + [SPECIAL["[PAD]"]] * (width - len(row)) for row in rows],
            token_type_ids=[segment + [0] * (width - len(segment)) for segment in types],
            attention_mask=[[1] * len(row) + [0] * (width - len(row)) for row in rows],
        )
        return FakeBatchEncoding({k: v[0] for k, v in encoding.items()}) if single else encoding

    def _encode(self, first: str, second: str | None, limit: int | None, special: bool) -> tuple[list[int], list[int]]:
        a, b = self.tokenize(first), self.tokenize(second) if second is not None else []
        if limit is not None:  # "only_second" first, as rerankers truncate the passage, not the query
            b = b[: max(0, limit - len(a))]
            a = a[:limit]
        cls, sep = ([SPECIAL["[CLS]"]], [SPECIAL["[SEP]"]]) if special else ([], [])
        ids = cls + [self.convert_tokens_to_ids(t) for t in a] + sep
        segment = [0] * len(ids)
        if second is not None:
            tail = [self.convert_tokens_to_ids(t) for t in b] + sep
            ids, segment = ids + tail, segment + [1] * len(tail)
        return ids, segment

    def text_of(self, ids: Sequence[int]) -> str | tuple[str, str] | None:
        """The text or pair this tokenizer turned into ``ids`` (padding ignored), if it did."""
        ids = list(ids)
        while ids and ids[-1] == SPECIAL["[PAD]"]:
            ids.pop()
        return self._texts_by_ids.get(tuple(ids))
