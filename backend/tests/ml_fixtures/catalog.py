"""The models the fixtures know: their real loaders, their fakes, the service seams they serve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.ml import CLASSIFICATION, SPARSE_EMBEDDING, LoadedModel, loading
from app.ml.resolver import ModelSource
from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService
from ml_fixtures import fakes


@dataclass(frozen=True)
class ModelKind:
    name: str
    source: ModelSource
    #: The public fixture that yields this model, and the one that yields a private copy.
    fixture: str
    copy_fixture: str
    service: type
    #: The application's loader in ``app.ml.loading``, looked up by name at call time so that
    #: patches of that module (the guard, the benchmark's probe) apply.
    loader: str
    #: ``make_fake(replay)``: a fake model replaying recorded outputs (``replay.get(text)``).
    make_fake: Callable[..., LoadedModel]
    #: The service method that calls the model: texts in, one output row per text out.
    model_call: str
    #: A service attribute naming a row's columns, where rows are lists (the classifier's labels).
    row_keys: str | None = None

    @property
    def model_name(self) -> str:
        return self.source.name

    def load_real(self, path: Path | None, device: str | None, dtype: str | None) -> LoadedModel:
        return getattr(loading, self.loader)(path, device, dtype)

    @staticmethod
    def service_path(service: object) -> Path | None:
        """The explicit model location a service instance asks for, if any."""
        return service.model_path

    def recordable(self, service: object, row: object) -> object:
        """A model-call row as a cassette stores it: token -> weight, or label -> logit."""
        return dict(zip(getattr(service, self.row_keys), row)) if self.row_keys else row


SPARSE = ModelKind(
    name="sparse_embedding",
    source=SPARSE_EMBEDDING,
    fixture="sparse_embedding_model_cached",
    copy_fixture="sparse_embedding_model_copy",
    service=SparseEmbeddingService,
    loader="load_sparse_embedding_model",
    make_fake=fakes.fake_sparse_embedding_model,
    model_call="_lexical_weights",
)
CLASSIFIER = ModelKind(
    name="classification",
    source=CLASSIFICATION,
    fixture="ml_classification_model_cached",
    copy_fixture="ml_classification_model_copy",
    service=MLClassificationService,
    loader="load_classification_model",
    make_fake=fakes.fake_classification_model,
    model_call="_logits",
    row_keys="labels",
)
KINDS = (SPARSE, CLASSIFIER)
