"""The models the fixtures know: their real loaders, their fakes, the service seams they serve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.ml import CLASSIFICATION, SPARSE_EMBEDDING, LoadedModel, loading
from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService
from ml_fixtures import fakes


@dataclass(frozen=True)
class ModelKind:
    name: str
    model_name: str
    #: The public fixture that yields this model.
    fixture: str
    service: type
    #: ``load_real(path, device, dtype)``, the application's own loader.
    load_real: Callable[..., LoadedModel]
    make_fake: Callable[[], LoadedModel]

    def service_path(self, service: object) -> object:
        """The explicit model path a service instance asks for, if any."""
        return getattr(service, "model_path", None) or getattr(service, "model_dir", None)


SPARSE = ModelKind(
    name="sparse_embedding",
    model_name=SPARSE_EMBEDDING.name,
    fixture="sparse_embedding_model_cached",
    service=SparseEmbeddingService,
    load_real=lambda path, device, dtype: loading.load_sparse_embedding_model(path, device, dtype),
    make_fake=fakes.fake_sparse_embedding_model,
)
CLASSIFIER = ModelKind(
    name="classification",
    model_name=CLASSIFICATION.name,
    fixture="ml_classification_model_cached",
    service=MLClassificationService,
    load_real=lambda path, device, dtype: loading.load_classification_model(path, device, dtype),
    make_fake=fakes.fake_classification_model,
)
KINDS = (SPARSE, CLASSIFIER)
