"""What both services share: input checks, resource lookup, the transaction rule."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy.orm import Session

from app.ml import LoadedModel
from app.models import Resource


class ModelBackedService:
    """A service whose model is loaded on first use, through :meth:`_load_model` alone."""

    _loaded: LoadedModel | None = None

    def _load_model(self) -> LoadedModel:
        """The loading seam: the one place the service gets its model (tests patch it)."""
        raise NotImplementedError

    @property
    def loaded(self) -> LoadedModel:
        """The model, loaded on first use."""
        if self._loaded is None:
            self._loaded = self._load_model()
        return self._loaded


class ResourceNotFoundError(LookupError):
    """No resource has that id."""


def require_text(text: object, what: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, not {type(text).__name__}")
    return text


def require_texts(texts: object) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str, not {type(texts).__name__}")
    return [require_text(text, f"texts[{i}]") for i, text in enumerate(texts)]


def require_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {value}")
    return value


def get_resource(db: Session, resource_id: int) -> Resource:
    resource = db.get(Resource, resource_id)
    if resource is None:
        raise ResourceNotFoundError(f"no resource with id {resource_id!r}")
    return resource


@contextmanager
def atomic(db: Session) -> Iterator[Session]:
    """Commit what the block wrote, or roll all of it back: a failure leaves the database as it was."""
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
