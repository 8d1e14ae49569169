"""One process-wide pool of loaded models, keyed by (model, device, dtype).

Every real load in a test run goes through :meth:`ModelPool.acquire`: the cached
fixtures and the services alike. A model already in the pool is handed out again; a
new one that would not fit the memory budget first evicts the least recently used.
The scope policy (``--ml-model-scope``) decides when the plugin calls :meth:`clear`.

Each entry keeps a :class:`~ml_fixtures.mutation.ModelSnapshot` taken at load: after every test
the plugin asks :meth:`ModelPool.modified`, and :meth:`ModelPool.refresh` puts a fresh load's
weights into a changed model's objects, so whoever holds it gets a clean model again.
"""

from __future__ import annotations

import gc
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ml_fixtures.declaration import LoadedModel
from ml_fixtures.mutation import ModelSnapshot, restore_in_place, torch_modules


def model_nbytes(model: object) -> int:
    """Bytes held by the parameters and buffers of a model's torch modules (0 for anything else)."""
    tensors = {
        id(t): t for _, module in torch_modules(model) for t in [*module.parameters(), *module.buffers()]
    }
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class ModelKey:
    """A pool entry: which model, from which explicit location (None: the default one), on which device and dtype."""

    model: str
    device: str = "auto"
    dtype: str = "default"
    path: str | None = None
    #: A private copy (``*_model_copy``): a fresh load outside the pool, reported under its own key.
    private: bool = False

    def __str__(self) -> str:
        where = f" @ {self.path}" if self.path is not None else ""
        copy = " (private copy)" if self.private else ""
        return f"{self.model}{where}{copy} [{self.device}, {self.dtype}]"


@dataclass
class _Entry:
    loaded: LoadedModel
    nbytes: int
    load: Callable[[], LoadedModel]
    snapshot: ModelSnapshot


class ModelPool:
    """Thread-safe LRU cache of loaded models under a memory budget (bytes)."""

    def __init__(
        self,
        memory_budget: int,
        on_load: Callable | None = None,
        on_evict: Callable[[ModelKey], None] | None = None,
        size_of: Callable[[object], int] = model_nbytes,
        unavailable: tuple[type[BaseException], ...] = (),
    ):
        self.memory_budget = memory_budget
        #: Errors that mean the model cannot be had: remembered, so it is not looked for again.
        self._unavailable = unavailable
        self._on_evict = on_evict or (lambda key: None)
        self._size_of = size_of
        #: ``on_load(key, load) -> LoadedModel``: wraps every real load (the load report times it).
        self._on_load = on_load or (lambda key, load: load())
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._failures: dict[ModelKey, BaseException] = {}
        self._known_sizes: dict[ModelKey, int] = {}
        self._lock = threading.RLock()

    def acquire(self, key: ModelKey, load: Callable[[], LoadedModel]) -> LoadedModel:
        """The pooled model for ``key``, loading it with ``load()`` the first time."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry.loaded
            if key in self._failures:  # a missing model is not looked for again in every module
                raise self._failures[key]
            self._make_room(self._known_sizes.get(key, 0))
            try:
                loaded = self._on_load(key, load)
            except self._unavailable as exc:
                self._failures[key] = exc
                raise
            nbytes = self._size_of(loaded.model)
            self._known_sizes[key] = nbytes
            self._make_room(nbytes)
            self._entries[key] = _Entry(loaded, nbytes, load, ModelSnapshot(loaded.model))
            return loaded

    def modified(self) -> list[tuple[ModelKey, list[str]]]:
        """Pooled models that differ from their state at load, with what changed."""
        with self._lock:
            found = [(key, entry.snapshot.changes()) for key, entry in self._entries.items()]
        return [(key, changes) for key, changes in found if changes]

    def refresh(self, key: ModelKey) -> None:
        """Load ``key``'s model again and restore the pooled objects from it, in place."""
        with self._lock:
            entry = self._entries[key]
            try:
                fresh = self._on_load(key, entry.load)
            except self._unavailable:  # cannot be cleaned: drop it, the next acquire loads anew
                del self._entries[key]
                raise
            restore_in_place(entry.loaded.model, fresh.model)
            entry.snapshot = ModelSnapshot(entry.loaded.model)

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._entries)

    def _make_room(self, nbytes: int) -> None:
        while self._entries and self.used_bytes + nbytes > self.memory_budget:
            key, _ = self._entries.popitem(last=False)
            self._on_evict(key)
            _release()
        if nbytes > self.memory_budget:
            warnings.warn(f"a model of {nbytes / 2**20:.0f} MB exceeds the model memory budget; it is kept alone", stacklevel=3)

    def clear(self) -> None:
        """Drop every model (and remembered failure), then free their memory."""
        with self._lock:
            had_models = bool(self._entries)
            self._entries.clear()
            self._failures.clear()
        if had_models:
            _release()


def _release() -> None:
    """Collect what was dropped; return CUDA's cached blocks to the driver."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
