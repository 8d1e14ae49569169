"""Reranking texts against a query with a cross-encoder (FlagEmbedding's ``FlagReranker``)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from app.ml import RERANK, LoadedModel, loading
from app.services.common import ModelBackedService, require_positive_int, require_text, require_texts


class RerankService(ModelBackedService):
    """Scores how relevant each text is to a query, reading both together (a cross-encoder)."""

    model_name = RERANK.name
    batch_size = 32
    max_length = 512

    def __init__(self, db: Session, model_path: str | Path | None = None, device: str | None = None):
        self.db = db
        #: None: the configured (``RERANK_MODEL_PATH``) or embedded model.
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device

    def _load_model(self) -> LoadedModel:
        return loading.load_rerank_model(self.model_path, self.device)

    def rerank(self, query: str, texts: list[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(index into texts, score)`` of the ``top_k`` (default: all) most relevant texts, best first.

        Scores are the model's relevance logits: higher is more relevant; ties keep the texts' order.
        """
        query = require_text(query, "query")
        if not isinstance(texts, list):
            raise TypeError(f"texts must be a list of str, not {type(texts).__name__}")
        texts = require_texts(texts)
        if top_k is not None:
            top_k = require_positive_int(top_k, "top_k")
        if not texts:
            return []
        ranked = sorted(enumerate(self._scores(query, texts)), key=lambda hit: (-hit[1], hit[0]))
        return ranked[:top_k]

    def _scores(self, query: str, texts: list[str]) -> list[float]:
        """The model call: the relevance logit of each ``(query, text)`` pair, as the model gives it."""
        model, _, _ = self.loaded
        scores = model.compute_score(
            [[query, text] for text in texts], batch_size=self.batch_size, max_length=self.max_length, normalize=False
        )
        return [float(score) for score in scores]
