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
identity and length otherwise (a 250k-entry vocabulary). :func:`restore_in_place` gives the same
objects the state of a fresh load.
"""

from __future__ import annotations

import operator
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ml_fixtures import pages

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


class ModelSnapshot:
    """The checkable state of a loaded ``(model, tokenizer, device)`` at one moment."""

    def __init__(
        self,
        loaded: Any,
        method: pages.Method | None = None,
        per_test_pages: int | None = None,
        per_test_bytes: int | None = None,
    ):
        settle(loaded)
        self.loaded = loaded
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
        self.backend = _Backend(loaded.tokenizer) if _Backend.applies(loaded.tokenizer) else None
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
    def deferred(self) -> bool:
        """Whether part of the byte check waits for :meth:`deferred_changes`."""
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

    def _state(self) -> tuple[list, ...]:
        """Per tensor: version counter, storage pointer, ``requires_grad`` (``training`` is an attribute)."""
        tensors = self.tensors
        data_ptr = sys.modules["torch"].Tensor.data_ptr if tensors else None
        return list(map(_VERSION, tensors)), list(map(data_ptr, tensors)), list(map(_REQUIRES_GRAD, tensors))

    def _same_storage(self, now: tuple[list, ...]) -> bool:
        """No tensor moved, grew or was written in place: the recorded addresses are still theirs."""
        return now[0] == self.state[0] and now[1] == self.state[1]

    def changes(self) -> list[str]:
        """What differs from the snapshot, one line per kind of change; empty if nothing does."""
        now, same_structure = self._state(), self._same_structure()
        same_storage = self._same_storage(now)
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
        """The byte checks that do not run after each test (see :attr:`deferred`)."""
        if not self.deferred or not self._same_storage(self._state()):
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

    def _torch_lines(self, now: tuple[list, ...], through_data: list[int]) -> list[str]:
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
        if self.backend:
            self.backend.close()


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


class _Backend:
    """The fast tokenizer's Rust backend: added tokens, components, truncation and padding.

    transformers sets the backend's truncation and padding on every call of the tokenizer from
    that call's arguments, and leaves them so: they change in honest use. Those left by a call are
    recorded (:func:`_track` wraps ``set_truncation_and_padding``); a state that no call left was
    set directly (``backend_tokenizer.enable_truncation(...)``) and is reported. Either way
    :meth:`reset` puts back the state at load after each test.
    """

    COMPONENTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
    MODEL_SETTINGS = (
        "unk_token", "continuing_subword_prefix", "max_input_chars_per_word", "dropout", "fuse_unk", "byte_fallback",
    )

    @staticmethod
    def applies(tokenizer: Any) -> bool:
        return _calls_owner(tokenizer) is not None and hasattr(vars(tokenizer).get("_tokenizer"), "truncation")

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.loaded = self._calls_state()
        self.state = self._state()
        _track(tokenizer)

    @property
    def _rust(self) -> Any:
        return self.tokenizer._tokenizer

    def _calls_state(self) -> tuple:
        return self._rust.truncation, self._rust.padding

    def _state(self) -> list:
        rust = self._rust
        model = rust.model
        return [
            rust.get_vocab_size(with_added_tokens=True),
            {i: token.__getstate__() for i, token in rust.get_added_tokens_decoder().items()},
            *(_component_state(getattr(rust, name)) for name in self.COMPONENTS),
            type(model).__name__,
            {name: getattr(model, name) for name in self.MODEL_SETTINGS if hasattr(model, name)},
            getattr(rust, "encode_special_tokens", None),
        ]

    def changes(self) -> list[str]:
        lines = []
        state = self._state()
        if state != self.state:
            names = ["vocabulary size", "added tokens", *self.COMPONENTS, "model", "model settings", "encode_special_tokens"]
            changed = [name for name, now, then in zip(names, state, self.state) if now != then]
            lines.append(f"tokenizer backend changed (add_tokens, backend_tokenizer.*): {', '.join(changed)}")
        calls, left = self._calls_state(), _LEFT.get(id(self.tokenizer))
        if calls != self.loaded and calls != left:
            expected = self.loaded if left is None else left
            changed = [name for name, now, then in zip(("truncation", "padding"), calls, expected) if now != then]
            lines.append(
                "tokenizer backend truncation or padding set outside a tokenizer call "
                f"(backend_tokenizer.enable_*/no_*): {', '.join(changed)}"
            )
        return lines

    def reset(self) -> None:
        truncation, padding = self.loaded
        if self._calls_state() != self.loaded:
            if truncation is None:
                self._rust.no_truncation()
            else:
                self._rust.enable_truncation(**truncation)
            if padding is None:
                self._rust.no_padding()
            else:
                self._rust.enable_padding(**padding)
        _LEFT[id(self.tokenizer)] = None

    def close(self) -> None:
        _untrack(self.tokenizer)


def _component_state(component: Any) -> bytes | None:
    return None if component is None else component.__getstate__()


#: id(tokenizer) -> the backend (truncation, padding) its last call left (None: no call since the reset).
_LEFT: dict[int, tuple | None] = {}
#: (class, its own set_truncation_and_padding) while wrapped.
_WRAPPED: list[tuple[type, Any]] = []


def _calls_owner(tokenizer: Any) -> type | None:
    """The class that defines the tokenizer's ``set_truncation_and_padding`` (transformers' fast tokenizers)."""
    return next((c for c in type(tokenizer).__mro__ if "set_truncation_and_padding" in vars(c)), None)


def _track(tokenizer: Any) -> None:
    """Record what each call of ``tokenizer`` leaves on its backend, wrapping the method while any is tracked."""
    owner = _calls_owner(tokenizer)
    if not any(cls is owner for cls, _ in _WRAPPED):
        original = vars(owner)["set_truncation_and_padding"]

        def set_truncation_and_padding(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if id(self) in _LEFT:
                _LEFT[id(self)] = (self._tokenizer.truncation, self._tokenizer.padding)
            return result

        owner.set_truncation_and_padding = set_truncation_and_padding
        _WRAPPED.append((owner, original))
    _LEFT[id(tokenizer)] = None


def _untrack(tokenizer: Any) -> None:
    _LEFT.pop(id(tokenizer), None)
    if not _LEFT:
        while _WRAPPED:
            owner, original = _WRAPPED.pop()
            owner.set_truncation_and_padding = original


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
