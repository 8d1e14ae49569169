"""Model layer: resolving, building and loading models. Importing it imports no ML library."""

from app.ml.errors import ModelUnavailableError
from app.ml.loading import LoadedModel, load_classification_model, load_rerank_model, load_sparse_embedding_model
from app.ml.resolver import CLASSIFICATION, CLASSIFICATION_BASE, RERANK, SPARSE_EMBEDDING, resolve_model_path

__all__ = [
    "CLASSIFICATION",
    "CLASSIFICATION_BASE",
    "SPARSE_EMBEDDING",
    "RERANK",
    "LoadedModel",
    "ModelUnavailableError",
    "load_classification_model",
    "load_rerank_model",
    "load_sparse_embedding_model",
    "resolve_model_path",
]
