"""Sparse lexical embeddings (BGE-M3 through FlagEmbedding) and lexical search."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ml import SPARSE_EMBEDDING, LoadedModel, loading
from app.models import Resource, ResourceSparseEmbedding
from app.services.common import ModelBackedService, atomic, get_resource, require_positive_int, require_text, require_texts
from app.services.rerank_service import RerankService


class SparseEmbeddingService(ModelBackedService):
    """Token -> weight embeddings of texts and resources, and search ranked by lexical matching."""

    model_name = SPARSE_EMBEDDING.name
    batch_size = 32
    max_length = 512
    #: How many lexical hits ``search(..., rerank=True)`` hands to the reranker (at least ``limit``).
    rerank_candidates = 50

    def __init__(
        self,
        db: Session,
        model_path: str | Path | None = None,
        device: str | None = None,
        reranker: RerankService | None = None,
    ):
        self.db = db
        #: None: the configured (``SPARSE_EMBEDDING_MODEL_PATH``) or embedded model.
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device
        #: The reranker of ``search(..., rerank=True)``; None: a ``RerankService`` made on first use.
        self.reranker = reranker

    def _load_model(self) -> LoadedModel:
        return loading.load_sparse_embedding_model(self.model_path, self.device)

    def generate_embedding(self, text: str) -> dict[str, float]:
        """BGE-M3 lexical weights of ``text``: token -> weight > 0, special tokens removed."""
        return self.generate_embeddings([require_text(text)])[0]

    def generate_embeddings(self, texts: list[str]) -> list[dict[str, float]]:
        """Batched :meth:`generate_embedding`; empty or blank texts give ``{}``."""
        texts = require_texts(texts)
        results: list[dict[str, float]] = [{} for _ in texts]
        todo = [i for i, text in enumerate(texts) if text.strip()]
        if not todo:
            return results
        special = set(self.loaded.tokenizer.all_special_tokens)
        for i, weights in zip(todo, self._lexical_weights([texts[i] for i in todo])):
            results[i] = {token: weight for token, weight in weights.items() if token not in special and weight > 0}
        return results

    def _lexical_weights(self, texts: list[str]) -> list[dict[str, float]]:
        """The model call: BGE-M3's lexical weights of each text, token -> weight, as the model gives them."""
        model, tokenizer, _ = self.loaded
        output = model.encode(
            texts,
            batch_size=self.batch_size,
            max_length=min(self.max_length, tokenizer.model_max_length),
            return_dense=False,
            return_sparse=True,
            return_colbert_vecs=False,
        )
        return [
            {tokenizer.convert_ids_to_tokens(int(token_id)): float(weight) for token_id, weight in weights.items()}
            for weights in output["lexical_weights"]
        ]

    def embed_resource(self, resource_id: int) -> dict[str, float]:
        """Compute and store the sparse vector of a resource; returns it."""
        resource = get_resource(self.db, resource_id)
        weights = self.generate_embedding(resource.text)
        with atomic(self.db):
            stored = self.db.get(ResourceSparseEmbedding, resource_id)
            if stored is None:
                self.db.add(ResourceSparseEmbedding(resource_id=resource_id, weights=weights, model_name=self.model_name))
            else:
                stored.weights = weights
                stored.model_name = self.model_name
        return weights

    @staticmethod
    def lexical_score(query: dict[str, float], document: dict[str, float]) -> float:
        """BGE-M3's lexical matching score: the sum of weight products over shared tokens."""
        return sum(weight * document[token] for token, weight in query.items() if token in document)

    def search(self, query: str, limit: int = 10, rerank: bool = False) -> list[tuple[int, float]]:
        """``(resource_id, score)`` of embedded resources that share tokens with ``query``, best first.

        With ``rerank=True`` the best ``max(limit, rerank_candidates)`` lexical hits are ranked again by
        the reranker, which reads the query and each resource's text together; the scores are then its own.
        """
        limit = require_positive_int(limit, "limit")
        if not isinstance(rerank, bool):
            raise TypeError(f"rerank must be bool, not {type(rerank).__name__}")
        query_weights = self.generate_embedding(query)
        if not query_weights:
            return []
        scored = [
            (row.resource_id, self.lexical_score(query_weights, row.weights))
            for row in self.db.scalars(select(ResourceSparseEmbedding))
        ]
        ranked = sorted((hit for hit in scored if hit[1] > 0), key=lambda hit: (-hit[1], hit[0]))
        if not rerank or not ranked:
            return ranked[:limit]
        candidates = [resource_id for resource_id, _ in ranked[: max(limit, self.rerank_candidates)]]
        texts = [self.db.get(Resource, resource_id).text for resource_id in candidates]
        if self.reranker is None:
            self.reranker = RerankService(self.db, device=self.device)
        return [(candidates[i], score) for i, score in self.reranker.rerank(query, texts, top_k=limit)]
