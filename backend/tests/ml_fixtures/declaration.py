"""What a project declares to the library: each model once (:class:`ModelSpec`), how its model call
is recorded (:class:`ModelCall`), and the project itself (:class:`Project`).

Everything the library does for a model — cached and copy fixtures, the autouse fake, the guard,
the load report, the modification check, cassettes, the warm preload — is derived from its
``ModelSpec``. The project file (``backend/tests/ml_models.py`` here) holds the declarations;
nothing in ``ml_fixtures`` imports the application.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ml_fixtures.drift import Comparison, Numeric
from ml_fixtures.keys import cassette_key


class LoadedModel(NamedTuple):
    """What the model fixtures yield: ``model, tokenizer, device = sparse_embedding_model_cached``."""

    model: Any
    tokenizer: Any
    device: str | None


class DeclarationError(TypeError):
    """A project's declaration is inconsistent; the message names the field and the fix."""


def _texts(texts: Sequence[str]) -> Sequence[str]:
    return texts


def _as_returned(service: object, output: Sequence) -> Sequence:
    return output


def _one_call(keys: list[str]) -> list[tuple]:
    return [(list(keys),)]


@dataclass(frozen=True)
class ModelCall:
    """The service method that calls the model, and how each call lands in a cassette.

    The method may have any signature: ``inputs`` takes its arguments (as the method does, without
    ``self``) and returns the call's inputs, one cassette key each — a text, or a tuple of texts
    such as a ``(query, passage)`` pair; ``outputs(service, result)`` returns the model's raw
    output for each input, in the same order. ``calls_for(keys)`` is the inverse of ``inputs``, for
    ``--ml-record=verify``: cassette keys in (``keys.input_of_key`` reads a tuple's back), the
    argument tuples of calls that together ask for exactly those inputs out. The defaults fit
    ``method(self, texts) -> rows``.
    """

    method: str
    inputs: Callable[..., Sequence] = _texts
    outputs: Callable[[Any, Any], Sequence] = _as_returned
    calls_for: Callable[[list[str]], Iterable[tuple]] = _one_call


def resolve(function: Callable) -> Callable:
    """``function`` as its module holds it now, so that patches of the module (the guard, a probe) apply."""
    owner: Any = sys.modules.get(function.__module__)
    if owner is None:
        return function
    for part in function.__qualname__.split("."):
        owner = getattr(owner, part, None)
        if owner is None:
            return function
    return owner


def _no_path() -> Path | None:
    return None


def _leave_mock(service: Any) -> None:
    return None


@dataclass(frozen=True)
class ModelSpec:
    """One model of the project, declared once.

    ``name`` gives the fixture names: ``<name>_model_cached``, ``<name>_model_copy`` and
    ``mock_<name>_service`` (the root conftest assigns them, e.g.
    ``rerank_model_cached = cached_model_fixture(RERANK)``).
    """

    #: Short name: fixture names and the xdist group of the tests that use it.
    name: str
    #: The model's name as the report, the pool and the cassettes show it (e.g. "BAAI/bge-m3").
    model_name: str
    #: The service class whose loading seam the library points at fakes or at the pool.
    service: type
    #: ``load(path, device, dtype) -> (model, tokenizer, device)``: the real loader, a function of a
    #: module; looked up there at call time, and blocked there by the guard in unit trees.
    load: Callable[..., Sequence]
    #: ``fake(replay) -> (model, tokenizer, device)``: a fake model answering like the real one;
    #: ``replay.get(key)`` is the recorded output for an input, or None.
    fake: Callable[[Any], Sequence]
    #: The service method that calls the model (recorded into cassettes, replayed by the fake).
    call: ModelCall
    #: ``locate() -> Path | None``: the default model's directory if it is on disk now, without
    #: building anything (cassette fingerprints, memory estimates).
    locate: Callable[[], Path | None] = _no_path
    #: ``mock(service_mock)`` gives the autospecced ``mock_<name>_service`` realistic return values.
    mock: Callable[[Any], None] = _leave_mock
    #: The service's loading seam: a method defined on the class, ``_load_model(self)``.
    seam: str = "_load_model"
    #: The service attribute holding an explicit model location (None: the default model); a
    #: service with another location gets a pool entry of its own and records no cassette.
    path_attribute: str | None = "model_path"
    #: Modules the loader imports (e.g. "FlagEmbedding"): the ``--ml-warm`` server imports them ahead of runs.
    preload: tuple[str, ...] = ()
    #: How ``--ml-record=verify`` compares the model's recorded outputs with its live ones (``drift.py``:
    #: ``SparseWeights``, ``Logits``, ``Scores``, each with tolerances to override); by default every number within 1e-4.
    compare: Comparison = Numeric()

    def __post_init__(self) -> None:
        where = f"ModelSpec {self.name!r}"
        if not self.name.isidentifier():
            raise DeclarationError(f"{where}: name must be a Python identifier (it names fixtures)")
        if not callable(getattr(self.service, self.seam, None)):
            raise DeclarationError(f"{where}: {self.service.__name__} has no method {self.seam!r} (the loading seam, seam=)")
        if not callable(getattr(self.service, self.call.method, None)):
            raise DeclarationError(f"{where}: {self.service.__name__} has no method {self.call.method!r} (call=ModelCall(...))")
        if not (hasattr(self.load, "__module__") and hasattr(self.load, "__qualname__")) or "<" in self.load.__qualname__:
            raise DeclarationError(f"{where}: load must be a function of a module (not a lambda), so the guard can block it")

    @property
    def cached_fixture(self) -> str:
        return f"{self.name}_model_cached"

    @property
    def copy_fixture(self) -> str:
        return f"{self.name}_model_copy"

    @property
    def mock_fixture(self) -> str:
        return f"mock_{self.name}_service"

    @property
    def fixtures(self) -> tuple[str, str, str]:
        return self.cached_fixture, self.copy_fixture, self.mock_fixture

    @property
    def loader_target(self) -> tuple[str, str]:
        """Where the guard blocks this model's loader: (module, attribute)."""
        return self.load.__module__, self.load.__qualname__

    def load_real(self, path: Path | None, device: str | None, dtype: str | None) -> LoadedModel:
        return LoadedModel(*resolve(self.load)(path, device, dtype))

    def make_fake(self, replay: Any) -> LoadedModel:
        return LoadedModel(*self.fake(replay))

    def call_entries(self, service: object, args: tuple, kwargs: dict, result: object) -> list[tuple[str, object]]:
        """``(cassette key, raw output)`` of each input of one model call, as ``ModelCall`` pairs them."""
        inputs, outputs = list(self.call.inputs(*args, **kwargs)), list(self.call.outputs(service, result))
        if len(inputs) != len(outputs):
            raise DeclarationError(
                f"ModelSpec {self.name!r}: for one call of {self.service.__name__}.{self.call.method}, "
                f"ModelCall.inputs gave {len(inputs)} inputs and ModelCall.outputs {len(outputs)} outputs; "
                "they must pair up one to one"
            )
        return [(cassette_key(call_input), output) for call_input, output in zip(inputs, outputs)]

    def bare_service(self, loaded: LoadedModel) -> object:
        """A service made without ``__init__`` whose seam returns ``loaded``, for calling its model call directly.

        ``--ml-record=verify`` calls the model-call method on it: the method may use the loaded model
        and the class's settings (batch size, maximum length), not what ``__init__`` sets.
        """
        service = object.__new__(self.service)
        setattr(service, self.seam, lambda: loaded)
        if self.path_attribute is not None:
            setattr(service, self.path_attribute, None)
        return service

    def path_of(self, service: object) -> Path | None:
        """The explicit model location a service instance asks for, if any."""
        if self.path_attribute is None:
            return None
        try:
            path = getattr(service, self.path_attribute)
        except AttributeError:
            raise DeclarationError(
                f"ModelSpec {self.name!r}: {type(service).__name__} has no attribute {self.path_attribute!r} "
                "(path_attribute=; None if the service always uses the default model)"
            ) from None
        return None if path is None else Path(path)


@dataclass(frozen=True)
class Project:
    """A repository's declaration: its models and where its files are.

    The root conftest hands it to the library by implementing the ``pytest_ml_project`` hook.
    """

    models: tuple[ModelSpec, ...]
    #: The directory holding the root conftest and the test trees (cassettes live beside them).
    tests_dir: Path
    #: Where the project's own built models (and the warm server's socket) are kept across runs.
    cache_dir: Callable[[], Path]
    #: The environment variable that sets ``cache_dir`` for the application; ``--ml-model-cache-dir``
    #: sets it, and the run pins it for its child processes.
    cache_dir_variable: str | None = None
    #: Errors that mean "this model cannot be had here": a cached fixture then skips with the reason.
    unavailable_errors: tuple[type[BaseException], ...] = ()
    #: Loggers whose INFO lines (model builds) are shown in the terminal, capture or not.
    build_loggers: tuple[str, ...] = ()
    #: Modules the warm server imports ahead of every warm run (``--ml-warm``), besides the models' own.
    warm_preload: tuple[str, ...] = ()
    #: The SQLAlchemy ``MetaData`` that ``test_db`` creates (None: an empty database).
    database_metadata: Any = None
    #: Subdirectories of ``tests_dir`` with a conftest of their own (generated trees copy them).
    trees: tuple[str, ...] = ()
    #: What child processes need on ``sys.path`` to import the application and the tests.
    python_path: tuple[Path, ...] = ()
    #: Other loader functions the guard blocks in unit trees, as "module:attribute" (``Class.method``).
    extra_loaders: tuple[str, ...] = ()
    cassette_dir: Path | None = None
    #: The file that declares the project (found at construction): every test depends on it.
    declared_in: str | None = field(default=None, compare=False)
    #: Packages whose versions a cassette records beside the device (the drift report shows both sides).
    environment_packages: tuple[str, ...] = ()
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.declared_in is None:  # frames: __post_init__, the dataclass's __init__, the declaration
            object.__setattr__(self, "declared_in", sys._getframe(2).f_code.co_filename)
        names = [spec.name for spec in self.models]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise DeclarationError(f"Project: model names declared twice: {', '.join(duplicated)}")
        object.__setattr__(self, "_by_name", {spec.model_name: spec for spec in self.models})

    @property
    def preload(self) -> tuple[str, ...]:
        """What the ``--ml-warm`` server imports: the project's list, then each model's, each module once."""
        return tuple(dict.fromkeys([*self.warm_preload, *(module for spec in self.models for module in spec.preload)]))

    @property
    def cassettes(self) -> Path:
        return self.cassette_dir or self.tests_dir / "cassettes"

    def spec_for(self, model_name: str) -> ModelSpec:
        return self._by_name[model_name]
