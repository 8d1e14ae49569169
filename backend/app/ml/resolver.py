"""Turn a model name into a local directory, without the network unless the user opts in.

Order: (1) an explicit path from an environment variable, then the directory this
application saves the model into, if it has one, (2) the Hugging Face cache, offline,
(3) the embedded default built from the packaged MiniLM, (4) a download, only with
``ML_ALLOW_DOWNLOAD=1``. Anything else raises :class:`ModelUnavailableError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app import config
from app.ml.errors import ModelUnavailableError


@dataclass(frozen=True)
class ModelSource:
    """Where one model may come from."""

    name: str
    env_var: str
    required_files: tuple[str, ...]
    #: ``embedded(build)``: the embedded default's directory (built once if ``build``), or None.
    embedded: Callable[[bool], Path] | None = None
    #: Where the application saves its own version of the model, if it does.
    saved: Callable[[], Path] | None = None

    def missing_files(self, path: Path) -> list[str]:
        return [f for f in self.required_files if not (path / f).is_file()]


def _sparse_embedded(build: bool = True) -> Path:
    from app.ml.embedded import embedded_bge_m3_dir

    return embedded_bge_m3_dir(build=build)


def _classifier_embedded(build: bool = True) -> Path:
    from app.ml.embedded import embedded_classifier_dir

    return embedded_classifier_dir(build=build)


def _reranker_embedded(build: bool = True) -> Path:
    from app.ml.embedded import embedded_reranker_dir

    return embedded_reranker_dir(build=build)


def _minilm_packaged(build: bool = True) -> Path:
    from app.ml.embedded import packaged_minilm_dir

    return packaged_minilm_dir()


SPARSE_EMBEDDING = ModelSource(
    name=config.SPARSE_EMBEDDING_MODEL_NAME,
    env_var="SPARSE_EMBEDDING_MODEL_PATH",
    required_files=("config.json", "sparse_linear.pt", "colbert_linear.pt"),
    embedded=_sparse_embedded,
)
RERANK = ModelSource(
    name=config.RERANK_MODEL_NAME,
    env_var="RERANK_MODEL_PATH",
    required_files=("config.json",),
    embedded=_reranker_embedded,
)
CLASSIFICATION = ModelSource(
    name=os.environ.get("CLASSIFICATION_MODEL_NAME", "backend/taxonomy-classifier"),
    env_var="CLASSIFICATION_MODEL_PATH",
    required_files=("config.json",),
    embedded=_classifier_embedded,
    saved=config.saved_classifier_dir,
)
CLASSIFICATION_BASE = ModelSource(
    name=config.CLASSIFICATION_BASE_MODEL_NAME,
    env_var="CLASSIFICATION_BASE_MODEL_PATH",
    required_files=("config.json",),
    embedded=_minilm_packaged
    if config.CLASSIFICATION_BASE_MODEL_NAME == "sentence-transformers/all-MiniLM-L6-v2"
    else None,
)


def _from_hf_cache(name: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=name, local_files_only=True))


def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=name))


def resolve_model_path(source: ModelSource, build: bool = True) -> Path:
    """The local directory holding ``source``'s model; raises ModelUnavailableError.

    ``build=False`` takes the embedded default only if it is already built (no torch import).
    """
    attempts: list[str] = []

    explicit = os.environ.get(source.env_var)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise ModelUnavailableError(source.name, [f"${source.env_var}={path}: no such directory"])
        missing = source.missing_files(path)
        if missing:
            raise ModelUnavailableError(
                source.name, [f"${source.env_var}={path}: missing {', '.join(missing)}"]
            )
        return path
    attempts.append(f"${source.env_var}: not set")

    if source.saved is not None:
        path = source.saved()
        if path.is_dir() and not source.missing_files(path):
            return path
        attempts.append(f"saved model {path}: not there")

    try:
        path = _from_hf_cache(source.name)
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        attempts.append(f"Hugging Face cache (offline): {type(exc).__name__}: {exc}".splitlines()[0])
    else:
        missing = source.missing_files(path)
        if not missing:
            return path
        attempts.append(f"Hugging Face cache {path}: missing {', '.join(missing)}")

    if source.embedded is not None:
        try:
            return source.embedded(build)
        except ModelUnavailableError:
            raise
        except Exception as exc:
            attempts.append(f"embedded default: {type(exc).__name__}: {exc}")
    else:
        attempts.append("embedded default: none for this model name")

    if config.downloads_allowed():
        try:
            return _download(source.name)
        except Exception as exc:
            attempts.append(f"download: {type(exc).__name__}: {exc}")
    else:
        attempts.append("download: disabled (set ML_ALLOW_DOWNLOAD=1 to allow)")

    raise ModelUnavailableError(
        source.name,
        attempts,
        hint=f"Provide it by setting {source.env_var} to a local directory, "
        f"or by placing it in the Hugging Face cache.",
    )
