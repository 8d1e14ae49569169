"""Term importance: how much a word should weigh in a sparse (lexical) embedding.

A trained BGE-M3 gives content words large weights, rare ones the largest, and function words
and punctuation (nearly) none. This table approximates that without any model: smoothed IDF of
each word over the shipped corpus (``data/taxonomy.jsonl``), scaled into BGE-M3's range, with the
function words of ``data/function_words.txt`` and punctuation at 0. A word the corpus lacks is as
rare as can be: it gets the largest weight.

The embedded BGE-M3's sparse head is fitted to this table (``embedded.py``), and the fake BGE-M3
of the tests answers with it, so both weigh "glacier" far above "the". No ML library is imported.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

DATA = Path(__file__).parent / "data"
CORPUS_PATH = DATA / "taxonomy.jsonl"
FUNCTION_WORDS_PATH = DATA / "function_words.txt"
#: The largest weight, about what a trained BGE-M3 gives its most important tokens.
MAX_WEIGHT = 0.3
WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, in order."""
    return WORD.findall(text.lower())


def _function_words(path: Path = FUNCTION_WORDS_PATH) -> frozenset[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


class TermImportance:
    """Word -> weight in [0, MAX_WEIGHT]: 0 for function words and punctuation, else scaled smoothed IDF."""

    def __init__(self, documents: Iterable[str], function_words: frozenset[str]):
        counted = [set(words(document)) for document in documents]
        self.documents = len(counted)
        self.document_frequency = Counter(word for document in counted for word in document)
        self.function_words = function_words
        self._max_idf = self.idf("")

    def idf(self, word: str) -> float:
        """Smoothed inverse document frequency: ``log((1 + N) / (1 + df)) + 1``."""
        return math.log((1 + self.documents) / (1 + self.document_frequency[word])) + 1

    def is_function(self, word: str) -> bool:
        return word in self.function_words or not any(c.isalnum() for c in word)

    def weight(self, word: str) -> float:
        word = word.lower()
        if self.is_function(word):
            return 0.0
        return MAX_WEIGHT * self.idf(word) / self._max_idf

    def fingerprint(self) -> str:
        """Changes when the corpus or the function words change (part of the embedded model's recipe)."""
        digest = hashlib.sha256(repr((sorted(self.document_frequency.items()), sorted(self.function_words))).encode())
        return digest.hexdigest()[:16]


@functools.cache
def shipped() -> TermImportance:
    """The table over the shipped corpus's training texts (held-back texts stay unseen)."""
    import json

    rows = [json.loads(line) for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    return TermImportance((row["text"] for row in rows if row["split"] == "train"), _function_words())
