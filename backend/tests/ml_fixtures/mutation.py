"""Detecting a test that changed a shared (pooled) model, cheaply enough to check after every test.

A :class:`ModelSnapshot` keeps, for every torch module inside a loaded model, its ``training``
flag and the identity of its parameters, buffers and submodules, and for every tensor its
version counter (in-place ops, also under ``torch.no_grad()``, bump ``tensor._version``),
``requires_grad`` and storage pointer, and the bytes of its first and last element on the CPU
(writes through ``param.data`` bypass the version counter; whole-tensor ones — ``.data.zero_()``,
``.data.mul_(0)``, ``.data.copy_(…)`` — change those elements unless they happen to be equal).
:meth:`ModelSnapshot.changes` compares those with what is there now: a few attribute and byte
reads per tensor, no hashing of weights.
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Iterator
from typing import Any

#: How many names a change lists before "and N more".
SHOWN = 3


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


def _walk(root: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, module in root.named_modules():
        yield (f"{prefix}.{name}" if prefix and name else prefix or name or "<root>"), module


class ModelSnapshot:
    """The checkable state of a model's torch modules at one moment."""

    def __init__(self, model: Any):
        self.model = model
        self.roots = self._roots()
        self.module_names: list[str] = []
        self.modules: list[Any] = []
        self.tensor_names: list[str] = []
        self.tensors: list[Any] = []
        for prefix, root in torch_modules(model):
            for name, module in _walk(root, prefix):
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
        self.members = [d[key] for d, key in self.slots]
        self.state = self._state()
        self.samples = _Samples(self.tensors, self.state[1])

    def _roots(self) -> list[tuple[str, int]]:
        return [(name, id(module)) for name, module in torch_modules(self.model)]

    def _same_structure(self) -> bool:
        return self._roots() == self.roots and list(map(len, self.dicts)) == self.sizes and all(
            map(operator.is_, [d.get(key) for d, key in self.slots], self.members)
        )

    def _state(self) -> tuple[list, ...]:
        tensors = self.tensors
        return (
            [t._version for t in tensors],
            [t.data_ptr() for t in tensors],
            [m.training for m in self.modules],
            [t.requires_grad for t in tensors],
        )

    def changes(self) -> list[str]:
        """What differs from the snapshot, one line per kind of change; empty if nothing does."""
        now, same_structure = self._state(), self._same_structure()
        # Sampled bytes are read only where no tensor moved or grew: then their addresses are valid.
        same_storage = now[0] == self.state[0] and now[1] == self.state[1]
        through_data = self.samples.changed() if same_storage else []
        if same_structure and not through_data and now == self.state:
            return []
        versions, storage, training, grads = (
            [i for i, (a, b) in enumerate(zip(before, after)) if a != b] for before, after in zip(self.state, now)
        )
        position = {id(d): i for i, d in enumerate(self.dicts)}
        structure = sorted(
            {i // 3 for i, (d, size) in enumerate(zip(self.dicts, self.sizes)) if len(d) != size}
            | {position[id(d)] // 3 for (d, key), old in zip(self.slots, self.members) if d.get(key) is not old}
        )
        tensor_names = [self.tensor_names[i] for i in versions], [self.tensor_names[i] for i in storage]
        lines = []
        if self._roots() != self.roots:
            names = sorted({name for name, _ in self._roots()} ^ {name for name, _ in self.roots}) or [
                name for (name, now_id), (_, then_id) in zip(self._roots(), self.roots) if now_id != then_id
            ]
            lines.append(f"model attributes replaced: {_names(names)}")
        if versions:
            lines.append(f"weights changed in place: {_names(tensor_names[0])}")
        if through_data:
            lines.append(
                f"weights changed through .data (no version bump): {_names([self.tensor_names[i] for i in through_data])}"
            )
        if storage:
            lines.append(f"tensors replaced or resized (.data assigned): {_names(tensor_names[1])}")
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
            lines.append(f"requires_grad changed: {_names([self.tensor_names[i] for i in grads])}")
        return lines


_CTYPES = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


class _Samples:
    """The first and the last element of each CPU tensor, as raw integers read at their addresses.

    Each is a ctypes object made once over the element's memory: reading ``.value`` is a plain
    memory read (a ``torch.cat`` of element views costs milliseconds at bge-m3's 391 tensors).
    They are only read while every tensor keeps its storage pointer and version (a resize bumps
    it), so they always read memory the tensor owns.
    """

    def __init__(self, tensors: list[Any], pointers: list[int]):
        self.owners: list[int] = []  # the tensor index of each sampled element
        self.cells: list[Any] = []
        for i, (tensor, pointer) in enumerate(zip(tensors, pointers)):
            size = tensor.element_size()
            if pointer == 0 or not tensor.is_cpu or not tensor.is_contiguous() or size not in _CTYPES:
                continue  # meta or GPU tensors: their version counter and pointer are what is checked
            for index in {0, tensor.numel() - 1} if tensor.numel() else ():
                self.owners.append(i)
                self.cells.append(_CTYPES[size].from_address(pointer + index * size))
        self.values = self.read()

    def read(self) -> list[int]:
        return [cell.value for cell in self.cells]

    def changed(self) -> list[int]:
        return sorted({i for i, now, then in zip(self.owners, self.read(), self.values) if now != then})


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def restore_in_place(model: Any, fresh: Any) -> None:
    """Give ``model`` the torch modules of ``fresh`` (a new load of the same model), keeping its objects.

    Whoever holds ``model`` or one of its modules — a module-scoped fixture, a service — then sees
    the clean weights, mode and structure.
    """
    torch = sys.modules["torch"]
    if isinstance(model, torch.nn.Module):
        _become(model, fresh)
        return
    for name, new in torch_modules(fresh):
        old = vars(model).get(name)
        if isinstance(old, torch.nn.Module):
            _become(old, new)
        else:
            setattr(model, name, new)


def _become(old: Any, new: Any) -> None:
    """``old`` takes ``new``'s whole state (an ``nn.Module`` keeps all of it in its ``__dict__``)."""
    state = dict(vars(new))
    vars(old).clear()
    vars(old).update(state)
