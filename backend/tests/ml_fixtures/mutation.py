"""Detecting a test that changed a shared (pooled) model, and putting the model back as loaded.

A :class:`ModelSnapshot` is taken of everything a cached fixture hands out, ``(model, tokenizer,
device)``, and :meth:`ModelSnapshot.changes` compares after each test:

- per tensor: its version counter (in-place ops bump ``tensor._version``, ``torch.no_grad()`` or
  not), storage pointer, ``requires_grad`` and hooks;
- every byte of every weight: the pages of the weight files that are copies now (a write of one
  element through ``.data`` included; :mod:`ml_fixtures.pages`), and a checksum of the tensors
  that are not in a file mapping. Where that does not fit after every test (a model of bge-m3's
  size), it runs in :meth:`ModelSnapshot.deferred_changes`, which the pool calls at the end of
  each test module, and in between the first and last element of each tensor it covers are compared;
- per torch module: its parameters, buffers and submodules (identity), ``training`` flag, hooks
  (forward, forward-pre, backward, backward-pre, state-dict) and other attributes; torch's global
  module hooks (:class:`GlobalHooks`);
- the attributes of the model object itself (FlagEmbedding's wrapper keeps its lengths, pooling,
  batch size there), of ``config`` and ``generation_config``, and of the tokenizer, with the fast
  backend's added tokens, components, truncation and padding.

Attributes are compared by value where they are scalars or small containers (a copy is kept), by
identity and length otherwise (a 250k-entry vocabulary). :func:`ml_fixtures.pool.restore_in_place` gives the same
objects the state of a fresh load.
"""

from __future__ import annotations

import operator
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple

from ml_fixtures import pages, tokenizer_calls
from ml_fixtures.tokenizer_backend import TokenizerBackend

#: How many names a change lists before "and N more".
SHOWN = 3
#: The scan of written pages runs after each test for models of at most this many mapped pages
#: (128 MiB of weights); at bge-m3's size (2.2 GB) it is deferred to the end of each module.
PER_TEST_PAGES = 1 << 15
#: The CPU tensors outside file mappings are checksummed after each test up to this many bytes.
PER_TEST_CHECKSUM_BYTES = 1 << 20
#: Containers up to this size are copied and compared by value; larger ones by identity and length.
SMALL = 256

HOOKS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
    "_state_dict_hooks": "state-dict hook",
    "_state_dict_pre_hooks": "state-dict pre-hook",
    "_load_state_dict_pre_hooks": "load-state-dict pre-hook",
    "_load_state_dict_post_hooks": "load-state-dict post-hook",
}
#: Bookkeeping that moves with the hooks above (and is named through them).
HOOK_COMPANIONS = {
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_is_full_backward_hook",
}
#: Checked elsewhere (structure, training mode) or changing in honest use: kept by identity only.
BY_IDENTITY = {"_parameters", "_buffers", "_modules", "deprecation_warnings"}


def torch_modules(model: Any) -> list[tuple[str, Any]]:
    """The ``torch.nn.Module`` objects a loaded model consists of: itself, or its module attributes.

    FlagEmbedding's ``BGEM3FlagModel`` is not a module; it holds one (``.model``).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    if isinstance(model, torch.nn.Module):
        return [("", model)]
    return [(name, value) for name, value in vars(model).items() if isinstance(value, torch.nn.Module)]


def _walk(root: Any, attribute: str) -> Iterator[tuple[str, Any]]:
    """Each module under ``root`` with its path from the model the fixture hands out (``model.bert.encoder``)."""
    for name, module in root.named_modules():
        yield ".".join(filter(None, ("model", attribute, name))), module


def _is_config(value: Any) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(value, (transformers.PretrainedConfig, transformers.GenerationConfig))


def settle(loaded: Any) -> None:
    """Do the one-time set-up that transformers would do on a test's first use, so that such use is
    no change: the output-capturing hooks (inactive unless asked for) that transformers 5 installs
    the first time a model is called with ``output_hidden_states`` or ``output_attentions``."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks

    for _, root in torch_modules(loaded.model):
        for module in root.modules():
            if isinstance(module, transformers.PreTrainedModel) and _CAN_RECORD_REGISTRY.get(module):
                maybe_install_capturing_hooks(module)


def shared_objects(loaded: Any) -> dict[str, Any]:
    """The objects a cached fixture hands out, by the name the messages use: the model, its torch
    modules, its configs and the tokenizer. The pool restores exactly these in place."""
    found: dict[str, Any] = {"model": loaded.model}
    for attribute, root in torch_modules(loaded.model):
        found.setdefault(".".join(filter(None, ("model", attribute))), root)
    seen = {id(value) for value in found.values()}
    for attribute, root in torch_modules(loaded.model):
        for name, module in _walk(root, attribute):
            for key in ("config", "generation_config"):
                value = vars(module).get(key)
                if _is_config(value) and id(value) not in seen:
                    seen.add(id(value))
                    found[f"{name}.{key}"] = value
    if loaded.tokenizer is not None:
        found["tokenizer"] = loaded.tokenizer
    return found


class TensorState(NamedTuple):
    """Per tensor, in the snapshot's order (``training`` is an attribute of the modules)."""

    versions: list[int]
    pointers: list[int]
    requires_grad: list[bool]

    def same_storage(self, other: TensorState) -> bool:
        """No tensor moved, grew or was written in place: the recorded addresses are still theirs."""
        return self.versions == other.versions and self.pointers == other.pointers


def watch(loaded: Any, method: pages.Method | None = None) -> ModelSnapshot:
    """Start watching a loaded model for changes: do transformers' one-time set-up (:func:`settle`),
    take its snapshot, and record what its tokenizer's calls leave (``tokenizer_calls.py``) until
    :meth:`ModelSnapshot.close`."""
    settle(loaded)
    snapshot = ModelSnapshot(loaded, method)
    if snapshot.backend is not None:
        tokenizer_calls.track(loaded.tokenizer)
        snapshot.tracks_tokenizer = True
    return snapshot


class ModelSnapshot:
    """The checkable state of a loaded ``(model, tokenizer, device)`` at one moment (:func:`watch` takes one)."""

    def __init__(
        self,
        loaded: Any,
        method: pages.Method | None = None,
        per_test_pages: int | None = None,
        per_test_bytes: int | None = None,
    ):
        self.loaded = loaded
        #: Whether :func:`watch` records the tokenizer's calls for it (until :meth:`close`).
        self.tracks_tokenizer = False
        self.shared = shared_objects(loaded)
        self.roots = self._roots()
        self.module_names: list[str] = []
        self.modules: list[Any] = []
        self.tensor_names: list[str] = []
        self.tensors: list[Any] = []
        for attribute, root in torch_modules(loaded.model):
            for name, module in _walk(root, attribute):
                self.module_names.append(name)
                self.modules.append(module)
                for tensors in (module._parameters, module._buffers):
                    for key, tensor in tensors.items():
                        if tensor is not None:
                            self.tensor_names.append(f"{name}.{key}")
                            self.tensors.append(tensor)
        # Structure: each module's parameter, buffer and submodule dicts, their sizes and (dict, key) -> object.
        self.dicts = [d for m in self.modules for d in (m._parameters, m._buffers, m._modules)]
        self.sizes = [len(d) for d in self.dicts]
        self.slots = [(d, key) for d in self.dicts for key in d]
        self.slot_dicts, self.slot_keys = [d for d, _ in self.slots], [key for _, key in self.slots]
        self.members = [d[key] for d, key in self.slots]
        self.training = [m.training for m in self.modules]
        self.state = self._state()
        modules = {id(m) for m in self.modules}
        named = list(zip(self.module_names, self.modules))
        named += [(name, obj) for name, obj in self.shared.items() if id(obj) not in modules]
        self.attributes = _Attributes(named)
        self.hooks = _Hooks(named[: len(self.modules)], list(zip(self.tensor_names, self.tensors))) if self.modules else None
        self.backend = TokenizerBackend(loaded.tokenizer) if TokenizerBackend.applies(loaded.tokenizer) else None
        self._weights(
            method if method is not None else pages.best_method(),
            PER_TEST_PAGES if per_test_pages is None else per_test_pages,
            PER_TEST_CHECKSUM_BYTES if per_test_bytes is None else per_test_bytes,
        )

    def _weights(self, method: pages.Method | None, per_test_pages: int, per_test_bytes: int) -> None:
        """Every byte: file pages where the tensors are mapped, checksums elsewhere; per test where it fits."""
        self.mapped = pages.FileBackedWeights(self.tensors, method)
        self.pages_per_test = self.mapped.pages <= per_test_pages
        cpu = sorted((i for i in self.mapped.outside if self.tensors[i].is_cpu), key=lambda i: self.tensors[i].nbytes)
        budget, per_test = per_test_bytes, []
        for i in cpu:
            if self.tensors[i].nbytes <= budget:
                budget -= self.tensors[i].nbytes
                per_test.append(i)
        self.checksums = pages.Checksums(self.tensors, per_test)
        self.deferred_checksums = pages.Checksums(self.tensors, sorted(set(self.mapped.outside) - set(per_test)))
        # Between deferred checks, the first and last elements of what they cover.
        sampled = self.deferred_checksums.indices + ([] if self.pages_per_test else [i for _, _, i in self.mapped.spans])
        self.samples = _Samples(self.tensors, sampled, self.mapped.mapping_of)

    @property
    def has_deferred_check(self) -> bool:
        """Whether part of the byte check waits for :meth:`deferred_changes` (at the end of each module)."""
        return not self.pages_per_test or bool(self.deferred_checksums.indices)

    def _roots(self) -> list[tuple[str, int]]:
        return [(name, id(module)) for name, module in torch_modules(self.loaded.model)]

    def _same_structure(self) -> bool:
        if self._roots() != self.roots or list(map(len, self.dicts)) != self.sizes:
            return False
        try:
            return all(map(operator.is_, map(operator.getitem, self.slot_dicts, self.slot_keys), self.members))
        except KeyError:  # one key removed, another added
            return False

    def _state(self) -> TensorState:
        tensors = self.tensors
        data_ptr = sys.modules["torch"].Tensor.data_ptr if tensors else None
        return TensorState(list(map(_VERSION, tensors)), list(map(data_ptr, tensors)), list(map(_REQUIRES_GRAD, tensors)))

    def changes(self) -> list[str]:
        """What differs from the snapshot, one line per kind of change; empty if nothing does."""
        now, same_structure = self._state(), self._same_structure()
        same_storage = now.same_storage(self.state)
        through_data = self.samples.changed() if same_storage else []
        written, rewritten = self.mapped.written() if same_storage and self.pages_per_test else ([], [])
        summed = self.checksums.changed() if same_storage else []
        attributes = self.attributes.changed()
        hooks = self.hooks.changed() if self.hooks else []
        backend = self.backend.changes() if self.backend else []
        if (
            same_structure
            and not (through_data or written or rewritten or summed or attributes or hooks or backend)
            and now == self.state
        ):
            return []
        lines = self._torch_lines(now, through_data)
        lines += self._byte_lines(written, rewritten, summed)
        if hooks:
            lines.append(f"hooks added or removed (register_*_hook, handle.remove()): {_names(hooks)}")
        lines += self.attributes.lines(attributes) + backend
        return lines

    def deferred_changes(self) -> list[str]:
        """The byte checks that do not run after each test (see :attr:`has_deferred_check`)."""
        if not self.has_deferred_check or not self._state().same_storage(self.state):
            return []  # moved tensors are reported by changes()
        written, rewritten = ([], []) if self.pages_per_test else self.mapped.written()
        return self._byte_lines(written, rewritten, self.deferred_checksums.changed())

    def _byte_lines(self, written: list[int], rewritten: list[int], summed: list[int]) -> list[str]:
        lines = []
        if written:
            files = ", ".join(sorted({self.mapped.file_name(i) for i in written}))
            lines.append(f"weights written (their bytes differ from {files}): {self._tensor_names(written)}")
        if rewritten:
            lines.append(f"weights written with the values they had (pages copied): {self._tensor_names(rewritten)}")
        if summed:
            lines.append(f"weights changed (checksum of their bytes): {self._tensor_names(summed)}")
        return lines

    def _tensor_names(self, indices: list[int]) -> str:
        return _names([self.tensor_names[i] for i in indices])

    def _torch_lines(self, now: TensorState, through_data: list[int]) -> list[str]:
        versions, storage, grads = (
            [i for i, (a, b) in enumerate(zip(before, after)) if a != b] for before, after in zip(self.state, now)
        )
        training = [i for i, (module, then) in enumerate(zip(self.modules, self.training)) if module.training != then]
        position = {id(d): i for i, d in enumerate(self.dicts)}
        structure = sorted(
            {i // 3 for i, (d, size) in enumerate(zip(self.dicts, self.sizes)) if len(d) != size}
            | {position[id(d)] // 3 for (d, key), old in zip(self.slots, self.members) if d.get(key) is not old}
        )
        lines = []
        if self._roots() != self.roots:
            names = sorted({name for name, _ in self._roots()} ^ {name for name, _ in self.roots}) or [
                name for (name, now_id), (_, then_id) in zip(self._roots(), self.roots) if now_id != then_id
            ]
            lines.append(f"model attributes replaced: {_names(names)}")
        if versions:
            lines.append(f"weights changed in place: {self._tensor_names(versions)}")
        if through_data:
            lines.append(f"weights changed through .data (no version bump): {self._tensor_names(through_data)}")
        if storage:
            lines.append(f"tensors replaced or resized (.data assigned): {self._tensor_names(storage)}")
        if structure:
            lines.append(
                "parameters, buffers or submodules added, removed or replaced in: "
                + _names([self.module_names[i] for i in structure])
            )
        switched_on = [self.module_names[i] for i in training if self.modules[i].training]
        switched_off = [self.module_names[i] for i in training if not self.modules[i].training]
        if switched_on:
            lines.append(f"training mode left on (model.train()): {_names(switched_on)}")
        if switched_off:
            lines.append(f"training mode switched off (model.eval()): {_names(switched_off)}")
        if grads:
            lines.append(f"requires_grad changed: {self._tensor_names(grads)}")
        return lines

    def reset_tokenizer_calls(self) -> None:
        """Put back the backend truncation and padding that tokenizer calls leave behind (see :class:`_Backend`)."""
        if self.backend:
            self.backend.reset()

    def close(self) -> None:
        """Stop recording what the tokenizer's calls leave (see :func:`watch`)."""
        if self.tracks_tokenizer:
            tokenizer_calls.untrack(self.loaded.tokenizer)
            self.tracks_tokenizer = False


class _Attributes:
    """The ``__dict__`` of each object: a copy of its small values, the identity of the others.

    The check after a test is, per object, one ``itemgetter`` call over its attributes (hooks and
    the parameter, buffer and submodule dicts apart) compared as one list, and a ``len`` of its
    ``__dict__``, of each hook dict and of each large container; only when something differs are
    the objects looked at one by one.
    """

    def __init__(self, named: list[tuple[str, Any]]):
        named = [(name, vars(obj)) for name, obj in named if hasattr(obj, "__dict__")]
        self.names = [name for name, _ in named]
        self.dicts = [d for _, d in named]
        self.copies = [{key: _copy(value, key) for key, value in d.items()} for d in self.dicts]
        self.getters = [_getter([key for key in d if key not in _NOT_PLAIN]) for d in self.dicts]
        self.values = [get(copy) for get, copy in zip(self.getters, self.copies)]
        self.sizes = list(map(len, self.dicts))
        self.large = [(i, key) for i, d in enumerate(self.dicts) for key, value in d.items() if _is_large(value, key)]
        self.lengths = self._lengths()

    def _lengths(self) -> list[int]:
        return [len(self.dicts[i].get(key, ())) for i, key in self.large]

    def _same(self) -> bool:
        try:
            if [get(d) for get, d in zip(self.getters, self.dicts)] != self.values:
                return False
        except _INCOMPARABLE:  # an attribute deleted (KeyError), or one whose == is no truth value (a new tensor)
            return False
        return list(map(len, self.dicts)) == self.sizes and self._lengths() == self.lengths

    def changed(self) -> list[int]:
        """Indices of the objects whose attributes differ."""
        if self._same():
            return []
        return [i for i in range(len(self.dicts)) if self._keys(i)]

    def _keys(self, i: int) -> list[str]:
        d, copy = self.dicts[i], self.copies[i]
        keys = [
            key
            for key in d.keys() | copy.keys()
            if key not in _NOT_PLAIN and (key not in d or key not in copy or not _same(d[key], copy[key]))
        ]
        keys += [key for (j, key), then in zip(self.large, self.lengths) if j == i and len(d.get(key, ())) != then]
        return sorted(set(keys))

    def lines(self, changed: list[int]) -> list[str]:
        attributes = [
            f"{self.names[i]}.{key}" + _values(self.copies[i].get(key, _MISSING), self.dicts[i].get(key, _MISSING))
            for i in changed
            for key in self._keys(i)
            if key not in ("training", *BY_IDENTITY)  # training: reported by the torch part
        ]
        return [f"attributes changed: {_names(attributes)}"] if attributes else []


class _Hooks:
    """The hooks of every module and tensor.

    torch registers each through a ``RemovableHandle``, whose class counter moves on every
    registration in the process: while it stands still no hook was added anywhere, and only the
    hooks there were at the snapshot are looked for. When it moved, every hook dict is compared;
    if none changed (a hook on another model), the new count is taken as the mark.
    """

    TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")

    def __init__(self, modules: list[tuple[str, Any]], tensors: list[tuple[str, Any]]):
        self.handles = sys.modules["torch"].utils.hooks.RemovableHandle
        self.mark = self.handles.next_id
        self.places = [(f"{name} ({label})", vars(m), key) for name, m in modules for key, label in HOOKS.items()]
        self.places += [
            (f"{name} (tensor {key.strip('_').replace('_', ' ')})", t, key) for name, t in tensors for key in self.TENSOR_HOOKS
        ]
        self.state = self._state(self.places)
        self.loaded = [(place, keys) for place, keys in zip(self.places, self.state) if keys]

    @staticmethod
    def _state(places: list[tuple[str, Any, str]]) -> list[tuple]:
        return [
            tuple((owner.get(key) if isinstance(owner, dict) else getattr(owner, key, None)) or ()) for _, owner, key in places
        ]

    def changed(self) -> list[str]:
        """The modules and tensors whose hooks differ, e.g. ``model.bert (forward hook)``."""
        unchanged = self._state([place for place, _ in self.loaded]) == [keys for _, keys in self.loaded]
        if self.handles.next_id == self.mark and unchanged:
            return []
        changed = [place[0] for place, now, then in zip(self.places, self._state(self.places), self.state) if now != then]
        if not changed:
            self.mark = self.handles.next_id
        return changed


#: Attributes that :class:`_Attributes` leaves to :class:`_Hooks` and the torch part (structure).
_NOT_PLAIN = HOOKS.keys() | HOOK_COMPANIONS | {"_parameters", "_buffers", "_modules"}


def _getter(keys: list[str]) -> Any:
    return operator.itemgetter(*keys) if keys else (lambda d: ())


#: What == of two values may raise: a tensor's or an array's result is no truth value.
_INCOMPARABLE = (KeyError, RuntimeError, TypeError, ValueError)
_MISSING = type("_Missing", (), {"__repr__": lambda self: "<not set>"})()
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _is_large(value: Any, key: str) -> bool:
    return key not in BY_IDENTITY and isinstance(value, (dict, list, tuple, set, frozenset)) and len(value) > SMALL


def _copy(value: Any, key: str = "", depth: int = 0) -> Any:
    """Small plain containers copied (recursively, three levels), everything else as is."""
    if key in BY_IDENTITY or depth > 3 or type(value) not in (dict, OrderedDict, list, tuple, set) or len(value) > SMALL:
        return value
    if isinstance(value, dict):
        return type(value)((k, _copy(v, depth=depth + 1)) for k, v in value.items())
    return type(value)(_copy(v, depth=depth + 1) for v in value)


def _same(now: Any, then: Any) -> bool:
    if now is then:
        return True
    try:
        return bool(now == then)
    except _INCOMPARABLE:
        return False


def _values(then: Any, now: Any) -> str:
    """`` (old -> new)`` for scalars, which says what the change was."""
    if all(isinstance(v, _SCALARS) or v is _MISSING for v in (then, now)):
        return f" ({_short(then)} -> {_short(now)})"
    return ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class GlobalHooks:
    """torch's process-wide module hooks (``torch.nn.modules.module.register_module_*_hook``)."""

    def __init__(self):
        self.module = sys.modules["torch"].nn.modules.module
        self.names = [
            name for name, value in vars(self.module).items() if name.startswith("_global_") and isinstance(value, dict)
        ]
        self.copies = [OrderedDict(getattr(self.module, name)) for name in self.names]
        self.full_backward = self.module._global_is_full_backward_hook

    def changes(self) -> list[str]:
        changed = [name for name, copy in zip(self.names, self.copies) if getattr(self.module, name) != copy]
        if not changed:
            return []
        kinds = [name.removeprefix("_global_").replace("_", " ") for name in changed]
        return [f"torch global module hooks added or removed (register_module_*_hook): {_names(kinds)}"]

    def restore(self) -> None:
        for name, copy in zip(self.names, self.copies):
            hooks = getattr(self.module, name)
            hooks.clear()
            hooks.update(copy)
        self.module._global_is_full_backward_hook = self.full_backward


class _Samples:
    """The bytes of the first and the last element of some CPU tensors, read where they lie.

    A write through ``.data`` bypasses the version counter; a whole-tensor one (``.data.zero_()``,
    ``.data.copy_(…)``) changes these elements. Elements in a file mapping are gathered with one
    numpy index over the mapping; the others are ctypes objects made once over their memory. They
    are only read while every tensor keeps its storage pointer and version (a resize bumps it), so
    they always read memory the tensors own.
    """

    def __init__(self, tensors: list[Any], indices: list[int], mapping_of: dict[int, pages.Mapping]):
        import ctypes

        import numpy as np

        self.np = np
        regions: dict[pages.Mapping, tuple[list[int], list[int]]] = {}
        self.cell_owners: list[int] = []
        self.cells: list[Any] = []
        for i in indices:
            tensor = tensors[i]
            size, pointer = tensor.element_size(), tensor.data_ptr()
            if pointer == 0 or not tensor.is_cpu or not tensor.is_contiguous() or not tensor.numel():
                continue
            for address in {pointer, pointer + (tensor.numel() - 1) * size}:
                if i in mapping_of:
                    offsets, owners = regions.setdefault(mapping_of[i], ([], []))
                    offsets += range(address - mapping_of[i].start, address - mapping_of[i].start + size)
                    owners += [i] * size
                else:
                    self.cell_owners.append(i)
                    self.cells.append((ctypes.c_uint8 * size).from_address(address))
        self.regions = [
            (
                np.frombuffer((ctypes.c_uint8 * (m.end - m.start)).from_address(m.start), np.uint8),
                np.array(offsets),
                np.array(owners),
            )
            for m, (offsets, owners) in regions.items()
        ]
        self.values = self.read()

    def read(self) -> list[Any]:
        return [memory[offsets] for memory, offsets, _ in self.regions] + list(map(bytes, self.cells))

    def changed(self) -> list[int]:
        now, found = self.read(), set()
        for (_, _, owners), after, before in zip(self.regions, now, self.values):
            found.update(owners[self.np.flatnonzero(after != before)].tolist())
        cells_now, cells_then = now[len(self.regions) :], self.values[len(self.regions) :]
        found.update(i for i, after, before in zip(self.cell_owners, cells_now, cells_then) if after != before)
        return sorted(found)


_VERSION, _REQUIRES_GRAD = operator.attrgetter("_version"), operator.attrgetter("requires_grad")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
