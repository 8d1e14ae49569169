"""Settings read from the environment, each with a default that works offline."""

from __future__ import annotations

import os
from pathlib import Path

SPARSE_EMBEDDING_MODEL_NAME = "BAAI/bge-m3"
RERANK_MODEL_NAME = "BAAI/bge-reranker-v2-m3"
#: Base encoder that the classifier is fine-tuned from; override to use another.
CLASSIFICATION_BASE_MODEL_NAME = os.environ.get(
    "CLASSIFICATION_BASE_MODEL", "sentence-transformers/all-MiniLM-L6-v2"
)


def database_url() -> str:
    return os.environ.get("DATABASE_URL", "sqlite:///backend.db")


def model_cache_dir() -> Path:
    """Where embedded models are built: ``ML_MODEL_CACHE_DIR``, else the user's cache."""
    explicit = os.environ.get("ML_MODEL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "backend-ml-models"


def models_dir() -> Path:
    """Where fine-tuned production models are saved: ``MODELS_DIR``, else ``./models``."""
    return Path(os.environ.get("MODELS_DIR", "models")).expanduser()


def saved_classifier_dir() -> Path:
    """Where ``MLClassificationService.train`` saves when the service has no ``model_path``."""
    return models_dir() / "classification"


def downloads_allowed() -> bool:
    """The network is used only when the user opts in with ``ML_ALLOW_DOWNLOAD=1``."""
    return os.environ.get("ML_ALLOW_DOWNLOAD", "") == "1"
