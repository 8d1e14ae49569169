"""This repository's declaration to the ML fixture library (``ml_fixtures/``): its models, once each.

A model is one ``ModelSpec``: the service whose loading seam the fixtures serve, the real loader,
the fake, and the model call that cassettes record. Everything else — the cached and copy fixtures,
the autouse fake, the guard, the load report, the modification check, cassettes, the warm
preload — follows from it (see "Adding a model" in ML_MODEL_OPTIMIZATION.md). The root conftest
returns ``PROJECT`` from ``pytest_ml_project`` and assigns each model's fixtures by name.
"""

from __future__ import annotations

from pathlib import Path

from app import config
from app.ml import ModelUnavailableError, loading, resolve_model_path, resolver
from app.ml.resolver import ModelSource
from app.models import Base
from app.services.ml_classification_service import ClassificationResult, LabelPrediction, MLClassificationService
from app.services.rerank_service import RerankService
from app.services.sparse_embedding_service import SparseEmbeddingService
from fake_models import fake_classification_model, fake_rerank_model, fake_sparse_embedding_model
from ml_fixtures.declaration import ModelCall, ModelSpec, Project
from ml_fixtures.drift import Logits, Scores, SparseWeights
from ml_fixtures.keys import input_of_key

TESTS = Path(__file__).resolve().parent


def on_disk(source: ModelSource):
    """``locate()`` of a model: its directory if resolvable now without building, else None."""

    def locate() -> Path | None:
        try:
            return resolve_model_path(source, build=False)
        except ModelUnavailableError:
            return None

    return locate


def _rerank_calls(keys: list[str]) -> list[tuple[str, list[str]]]:
    """The inverse of the reranker's ``inputs``: its ``(query, text)`` keys as one call per query."""
    texts: dict[str, list[str]] = {}
    for query, text in map(input_of_key, keys):
        texts.setdefault(query, []).append(text)
    return list(texts.items())


def _mock_sparse(service) -> None:
    service.model_name = SparseEmbeddingService.model_name
    service.generate_embedding.return_value = {"machine": 0.31, "learning": 0.27, "model": 0.18}
    service.generate_embeddings.side_effect = lambda texts: [{token: 0.2 for token in text.lower().split()} for text in texts]
    service.embed_resource.return_value = {"machine": 0.31, "learning": 0.27}
    service.search.return_value = [(1, 0.42), (3, 0.17)]


def _mock_classifier(service) -> None:
    result = ClassificationResult(
        predictions=[LabelPrediction("technology", 0.82), LabelPrediction("finance", 0.11), LabelPrediction("health", 0.04)],
        model_version="mock-classifier",
    )
    service.predict.return_value = result
    service.predict_batch.side_effect = lambda texts, top_k=3: [result] * len(texts)
    service.classify_resource.return_value = result
    service.train.return_value = "mock-classifier"


def _mock_reranker(service) -> None:
    service.model_name = RerankService.model_name
    service.rerank.side_effect = lambda query, texts, top_k=None: [(i, 5.0 - i) for i in range(len(texts))][:top_k]


SPARSE = ModelSpec(
    name="sparse_embedding",
    model_name=resolver.SPARSE_EMBEDDING.name,
    service=SparseEmbeddingService,
    load=loading.load_sparse_embedding_model,
    fake=fake_sparse_embedding_model,
    call=ModelCall("_lexical_weights"),  # texts in, token -> weight out
    compare=SparseWeights(),
    locate=on_disk(resolver.SPARSE_EMBEDDING),
    mock=_mock_sparse,
    preload=("FlagEmbedding", "transformers.models.bert.modeling_bert", "transformers.models.xlm_roberta.modeling_xlm_roberta"),
)
CLASSIFIER = ModelSpec(
    name="ml_classification",
    model_name=resolver.CLASSIFICATION.name,
    service=MLClassificationService,
    load=loading.load_classification_model,
    fake=fake_classification_model,
    # texts in, a row of logits out: recorded as label -> logit
    call=ModelCall("_logits", outputs=lambda service, rows: [dict(zip(service.labels, row)) for row in rows]),
    compare=Logits(),
    locate=on_disk(resolver.CLASSIFICATION),
    mock=_mock_classifier,
    preload=("transformers.models.bert.modeling_bert",),
)
RERANK = ModelSpec(
    name="rerank",
    model_name=resolver.RERANK.name,
    service=RerankService,
    load=loading.load_rerank_model,
    fake=fake_rerank_model,
    # one query and many texts in, a logit per text out: recorded per (query, text) pair
    call=ModelCall("_scores", inputs=lambda query, texts: [(query, text) for text in texts], calls_for=_rerank_calls),
    compare=Scores(),
    locate=on_disk(resolver.RERANK),
    mock=_mock_reranker,
    preload=("FlagEmbedding", "transformers.models.xlm_roberta.modeling_xlm_roberta"),
)

PROJECT = Project(
    models=(SPARSE, CLASSIFIER, RERANK),
    tests_dir=TESTS,
    cache_dir=config.model_cache_dir,
    cache_dir_variable="ML_MODEL_CACHE_DIR",
    unavailable_errors=(ModelUnavailableError,),
    build_loggers=("app.ml",),
    warm_preload=(
        "torch", "transformers", "sqlalchemy", "sqlalchemy.orm", "psutil", "filelock", "huggingface_hub", "safetensors",
        "psycopg",
    ),
    database_metadata=Base.metadata,
    trees=("unit", "services", "integration"),
    python_path=(TESTS.parent, TESTS),
    environment_packages=("torch", "transformers", "FlagEmbedding"),
)
