"""The models the fixtures know: their real loaders, their fakes, the service seams they serve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.ml import CLASSIFICATION, SPARSE_EMBEDDING, LoadedModel, loading
from app.ml.resolver import ModelSource
from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService
from ml_fixtures import fakes


@dataclass(frozen=True)
class ModelKind:
    name: str
    source: ModelSource
    #: The public fixture that yields this model.
    fixture: str
    service: type
    #: ``load_real(path, device, dtype)``, the application's own loader, looked up at call time
    #: so that patches of ``app.ml.loading`` (the guard, the benchmark's probe) apply.
    load_real: Callable[..., LoadedModel]
    #: ``make_fake(replay)``: a fake model replaying recorded outputs (text -> output).
    make_fake: Callable[[dict], LoadedModel]
    #: The service method that calls the model: texts in, one output row per text out.
    model_call: str
    #: ``recordable(service, row)``: a row as a cassette stores it.
    recordable: Callable[[object, object], object]

    @property
    def model_name(self) -> str:
        return self.source.name

    def service_path(self, service: object) -> object:
        """The explicit model path a service instance asks for, if any."""
        return getattr(service, "model_path", None) or getattr(service, "model_dir", None)


SPARSE = ModelKind(
    name="sparse_embedding",
    source=SPARSE_EMBEDDING,
    fixture="sparse_embedding_model_cached",
    service=SparseEmbeddingService,
    load_real=lambda path, device, dtype: loading.load_sparse_embedding_model(path, device, dtype),
    make_fake=fakes.fake_sparse_embedding_model,
    model_call="_lexical_weights",
    recordable=lambda service, weights: weights,
)
CLASSIFIER = ModelKind(
    name="classification",
    source=CLASSIFICATION,
    fixture="ml_classification_model_cached",
    service=MLClassificationService,
    load_real=lambda path, device, dtype: loading.load_classification_model(path, device, dtype),
    make_fake=fakes.fake_classification_model,
    model_call="_logits",
    recordable=lambda service, logits: dict(zip(service.labels, logits)),
)
KINDS = (SPARSE, CLASSIFIER)
