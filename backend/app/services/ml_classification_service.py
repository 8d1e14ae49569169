"""Text classification with a fine-tuned transformer, stored per resource."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app import config
from app.ml import CLASSIFICATION_BASE, LoadedModel, loading, resolve_model_path
from app.ml.loading import inference_context
from app.models import Category, ResourceClassification
from app.services.common import ModelBackedService, atomic, get_resource, require_positive_int, require_texts


@dataclass(frozen=True)
class LabelPrediction:
    label: str
    confidence: float


@dataclass(frozen=True)
class ClassificationResult:
    #: Best first; confidences are the softmax over all labels.
    predictions: list[LabelPrediction]
    model_version: str

    @property
    def top(self) -> LabelPrediction:
        return self.predictions[0]


def softmax(row: Sequence[float]) -> list[float]:
    peak = max(row)
    exps = [math.exp(x - peak) for x in row]
    total = sum(exps)
    return [x / total for x in exps]


class MLClassificationService(ModelBackedService):
    """Predicts taxonomy labels for texts and resources; trains new versions of its model."""

    max_length = 256

    def __init__(
        self,
        db: Session,
        model_path: str | Path | None = None,
        device: str | None = None,
        *,
        model_dir: str | Path | None = None,
    ):
        """``model_dir`` is an older name of ``model_path``."""
        if model_dir is not None and model_path is not None:
            raise TypeError("give model_path or model_dir, not both")
        self.db = db
        model_path = model_path if model_path is not None else model_dir
        #: None: the configured (``CLASSIFICATION_MODEL_PATH``), saved or embedded model.
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device

    def _load_model(self) -> LoadedModel:
        return loading.load_classification_model(self.model_path, self.device)

    @property
    def labels(self) -> list[str]:
        id2label = self.loaded.model.config.id2label
        return [id2label[i] for i in sorted(id2label)]

    @property
    def model_version(self) -> str:
        config_ = self.loaded.model.config
        return getattr(config_, "model_version", None) or str(self.model_path or "unversioned")

    def train(self, examples: Sequence[tuple[str, str]], **hyperparameters) -> str:
        """Fine-tune the base encoder on ``(text, label)`` pairs, save to ``model_path``; returns the version."""
        from app.ml.training import fine_tune, validate_examples

        pairs = validate_examples(examples)
        target = self.model_path or config.saved_classifier_dir()
        version = fine_tune(
            resolve_model_path(CLASSIFICATION_BASE), pairs, target, base_name=CLASSIFICATION_BASE.name, **hyperparameters
        )
        self.model_path = target
        self._loaded = None
        return version

    def predict(self, text: str, top_k: int = 3) -> ClassificationResult:
        """The ``top_k`` most likely labels of ``text``; ValueError on empty text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        return self.predict_batch([text], top_k)[0]

    def predict_batch(self, texts: list[str], top_k: int = 3) -> list[ClassificationResult]:
        """:meth:`predict` for many texts in one forward pass."""
        texts = require_texts(texts)
        top_k = require_positive_int(top_k, "top_k")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"texts[{i}] is empty; nothing to classify")
        if not texts:
            return []
        labels, version = self.labels, self.model_version
        results = []
        for logits in self._logits(texts):
            ranked = sorted(zip(labels, softmax(logits)), key=lambda pair: -pair[1])[:top_k]
            results.append(ClassificationResult([LabelPrediction(label, c) for label, c in ranked], version))
        return results

    def _logits(self, texts: list[str]) -> list[list[float]]:
        """The model call: one row of logits per text, in label-id order."""
        model, tokenizer, device = self.loaded
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with inference_context():
            logits = model(**inputs.to(device)).logits
        return logits.float().cpu().tolist() if hasattr(logits, "cpu") else logits

    def classify_resource(self, resource_id: int, top_k: int = 3) -> ClassificationResult:
        """Predict a resource's labels and store them, replacing earlier ones."""
        resource = get_resource(self.db, resource_id)
        result = self.predict(resource.text, top_k)
        with atomic(self.db):
            self.db.execute(delete(ResourceClassification).where(ResourceClassification.resource_id == resource_id))
            for rank, prediction in enumerate(result.predictions):
                self.db.add(
                    ResourceClassification(
                        resource_id=resource_id,
                        category=self._category(prediction.label),
                        confidence=prediction.confidence,
                        rank=rank,
                        model_version=result.model_version,
                    )
                )
        return result

    def _category(self, name: str) -> Category:
        category = self.db.scalar(select(Category).where(Category.name == name))
        if category is None:
            category = Category(name=name)
            self.db.add(category)
        return category
