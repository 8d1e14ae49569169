"""One process-wide pool of loaded models, keyed by (model, device, dtype).

Every real load in a test run goes through :meth:`ModelPool.acquire`: the cached
fixtures and the services alike. A model already in the pool is handed out again; a
new one that would not fit the memory budget first evicts the least recently used.
The scope policy (``--ml-model-scope``) decides when the plugin calls :meth:`clear`.

Each entry keeps a :class:`~ml_fixtures.mutation.ModelSnapshot` of its ``(model, tokenizer,
device)`` taken at load. After each test's teardown (its fixtures undone: a ``monkeypatch`` of the
model is no change) :meth:`ModelPool.after_test` checks every pooled model, runs the deferred checks
at the end of a module, and puts a fresh load's state into the objects of each changed model, so
whoever holds them gets it as loaded again. Each change found, there or before an eviction, goes to
``on_changed`` (the plugin's :class:`~ml_fixtures.modification.ModificationCheck`).
"""

from __future__ import annotations

import gc
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ml_fixtures.declaration import LoadedModel
from ml_fixtures.mutation import GlobalHooks, ModelSnapshot, shared_objects, torch_modules, watch


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


class ModelRestoreError(Exception):
    """A pooled model that a test changed could not be loaded again to put it back as loaded."""


@dataclass
class _Entry:
    loaded: LoadedModel
    nbytes: int
    load: Callable[[], LoadedModel]
    snapshot: ModelSnapshot
    #: Reported as changed; :meth:`ModelPool.after_test` restores it.
    changed: bool = False
    #: The tests since the last clean deferred check (for a snapshot that defers part of its check).
    unchecked: list[str] = field(default_factory=list)


class ModelPool:
    """Thread-safe LRU cache of loaded models under a memory budget (bytes)."""

    def __init__(
        self,
        memory_budget: int,
        on_load: Callable | None = None,
        on_evict: Callable[[ModelKey], None] | None = None,
        size_of: Callable[[object], int] = model_nbytes,
        unavailable_errors: tuple[type[BaseException], ...] = (),
        on_changed: Callable[[ModelKey, list[str]], None] | None = None,
    ):
        self.memory_budget = memory_budget
        #: Errors that mean the model cannot be had: remembered, so it is not looked for again.
        self._unavailable_errors = unavailable_errors
        self._on_evict = on_evict or (lambda key: None)
        #: ``on_changed(key, changes)``: each change found in a pooled model, after a test or before an eviction.
        self._on_changed = on_changed or (lambda key, changes: None)
        self._size_of = size_of
        #: ``on_load(key, load) -> LoadedModel``: wraps every real load (the load report times it).
        self._on_load = on_load or (lambda key, load: load())
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()
        self._failures: dict[ModelKey, BaseException] = {}
        self._known_sizes: dict[ModelKey, int] = {}
        self._lock = threading.RLock()
        self._global_hooks: GlobalHooks | None = None
        self._global_hooks_changed = False

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
            except self._unavailable_errors as exc:
                self._failures[key] = exc
                raise
            nbytes = self._size_of(loaded.model)
            self._known_sizes[key] = nbytes
            self._make_room(nbytes)
            self._entries[key] = _Entry(loaded, nbytes, load, watch(loaded))
            if self._global_hooks is None and "torch" in sys.modules:
                self._global_hooks = GlobalHooks()
            return loaded

    def after_test(self, test: str, module_ends: bool, release: bool) -> None:
        """After ``test``'s teardown: check every pooled model, and run the deferred checks when its
        module ends (or the models go); then drop every model (``release``) or restore the changed
        ones in place. Each change found goes to ``on_changed``.

        Raises :class:`ModelRestoreError` naming the model when one cannot be loaded again.
        """
        with self._lock:
            self._check(test)
            if module_ends or release:
                for key, entry in self._entries.items():
                    self._deferred_check(key, entry, f"after {test}")
            if release:
                self.clear()
            else:
                self.restore()

    def _check(self, test: str) -> None:
        for key, entry in self._entries.items():
            if entry.snapshot.has_deferred_check and entry.unchecked[-1:] != [test]:
                entry.unchecked.append(test)
            changes = entry.snapshot.changes()
            if changes:
                entry.changed = True
                self._on_changed(key, changes)
        if self._global_hooks is not None and self._entries and not self._global_hooks_changed:
            changes = self._global_hooks.changes()
            if changes:  # they run in every model: reported with the one used last
                self._global_hooks_changed = True
                self._on_changed(next(reversed(self._entries)), changes)

    def _deferred_check(self, key: ModelKey, entry: _Entry, when: str) -> None:
        """The deferred checks of one model, naming the tests since the last clean one."""
        tests, entry.unchecked = entry.unchecked, []
        changes = [] if entry.changed else entry.snapshot.deferred_changes()
        if changes:
            entry.changed = True
            culprits = f"found by the deferred check {when}; one of these tests did it: {', '.join(tests)}"
            self._on_changed(key, [*changes, culprits])

    def restore(self) -> None:
        """Put each changed model back as loaded, in its own objects; undo leftover tokenizer-call
        state and global hooks. Raises :class:`ModelRestoreError` for a model that cannot be loaded."""
        failed = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                if not entry.changed:
                    entry.snapshot.reset_tokenizer_calls()
                    continue
                try:
                    fresh = self._on_load(key, entry.load)
                except self._unavailable_errors as exc:  # cannot be cleaned: drop it, later acquires fail as unavailable
                    self._drop(key)
                    self._failures[key] = exc
                    failed.append(f"{key}: {exc}")
                    continue
                entry.snapshot.close()
                restore_in_place(entry.snapshot, fresh)
                entry.snapshot, entry.changed, entry.unchecked = watch(entry.loaded), False, []
            self._restore_global_hooks()
        if failed:
            raise ModelRestoreError(
                "a test changed the shared model and it could not be loaded again to restore it:\n  "
                + "\n  ".join(failed)
                + "\nLater requests for it fail as unavailable; objects already handed out keep the change."
            )

    def _restore_global_hooks(self) -> None:
        if self._global_hooks is not None and self._global_hooks_changed:
            self._global_hooks.restore()
            self._global_hooks_changed = False

    def _drop(self, key: ModelKey) -> _Entry:
        entry = self._entries.pop(key)
        entry.snapshot.close()
        return entry

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._entries)

    def _make_room(self, nbytes: int) -> None:
        while self._entries and self.used_bytes + nbytes > self.memory_budget:
            key = next(iter(self._entries))
            entry = self._entries[key]
            # Checked before it goes: a change is reported with the test that made it evict.
            changes = [] if entry.changed else entry.snapshot.changes()
            if changes:
                entry.changed = True
                self._on_changed(key, changes)
            self._deferred_check(key, entry, "when it was evicted")
            self._drop(key)
            self._on_evict(key)
            _release()
        if nbytes > self.memory_budget:
            warnings.warn(f"a model of {nbytes / 2**20:.0f} MB exceeds the model memory budget; it is kept alone", stacklevel=3)

    def clear(self) -> None:
        """Drop every model (and remembered failure), then free their memory."""
        with self._lock:
            had_models = bool(self._entries)
            for key in list(self._entries):
                self._drop(key)
            self._failures.clear()
            self._restore_global_hooks()
            self._global_hooks = None
        if had_models:
            _release()


def _release() -> None:
    """Collect what was dropped; return CUDA's cached blocks to the driver."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def restore_in_place(snapshot: ModelSnapshot, fresh: Any) -> None:
    """Give the objects of ``snapshot`` (model, its modules, configs, tokenizer) the state of ``fresh``,
    a new load of the same model, keeping their identity.

    Whoever holds one of them — a module-scoped fixture, a service — then sees it as loaded. The
    states are exchanged: ``fresh``'s objects get the changed state, so that nothing they do when
    they are dropped (FlagEmbedding's ``__del__`` moves its model to the CPU) touches the kept ones;
    on each side, references to the other side's objects are pointed at their counterparts.
    """
    pairs = [(snapshot.shared[name], new) for name, new in shared_objects(fresh).items() if name in snapshot.shared]
    for old, new in pairs:
        old_state, new_state = dict(vars(old)), dict(vars(new))
        vars(old).clear()
        vars(old).update(new_state)
        vars(new).clear()
        vars(new).update(old_state)
    sides = (
        ([old for old, _ in pairs], {id(new): old for old, new in pairs}),
        ([new for _, new in pairs], {id(old): new for old, new in pairs}),
    )
    for side, counterpart in sides:
        _point_at(side, counterpart)


def _point_at(objects: list[Any], counterpart: dict[int, Any]) -> None:
    """In ``objects`` and the modules under them, replace each attribute value found in ``counterpart``."""
    torch = sys.modules["torch"]
    holders = objects + [m for obj in objects if isinstance(obj, torch.nn.Module) for m in obj.modules()]
    for holder in holders:
        d = vars(holder)
        for key, value in list(d.items()):
            if id(value) in counterpart:
                d[key] = counterpart[id(value)]
