"""What each call of a pooled fast tokenizer leaves on its Rust backend: a process-wide patch of the
tokenizer class, in place while any pooled tokenizer is tracked.

transformers sets the backend's truncation and padding on every call of a fast tokenizer from that
call's arguments (``set_truncation_and_padding``), and leaves them so: they change in honest use.
While a tokenizer is tracked, the class's method is wrapped to record the state each call leaves
(:func:`left_by_calls`), so that the modification check (``mutation.py``) can tell such a state from
one set directly on the backend. The last :func:`untrack` puts the class's own method back.
"""

from __future__ import annotations

from typing import Any

#: id(tokenizer) -> the backend (truncation, padding) its last call left (None: no call since :func:`forget_calls`).
_LEFT: dict[int, tuple | None] = {}
#: (class, its own set_truncation_and_padding) while wrapped.
_WRAPPED: list[tuple[type, Any]] = []


def calls_owner(tokenizer: Any) -> type | None:
    """The class that defines the tokenizer's ``set_truncation_and_padding`` (transformers' fast tokenizers)."""
    return next((c for c in type(tokenizer).__mro__ if "set_truncation_and_padding" in vars(c)), None)


def track(tokenizer: Any) -> None:
    """Record what each call of ``tokenizer`` leaves on its backend, wrapping its class's method if need be."""
    owner = calls_owner(tokenizer)
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


def left_by_calls(tokenizer: Any) -> tuple | None:
    """The backend's (truncation, padding) as the last call of ``tokenizer`` left it; None if none was made."""
    return _LEFT.get(id(tokenizer))


def forget_calls(tokenizer: Any) -> None:
    """Start over: no call of ``tokenizer`` since now."""
    if id(tokenizer) in _LEFT:
        _LEFT[id(tokenizer)] = None


def untrack(tokenizer: Any) -> None:
    """Stop tracking ``tokenizer``; with none left, every wrapped class gets its own method back."""
    _LEFT.pop(id(tokenizer), None)
    if not _LEFT:
        while _WRAPPED:
            owner, original = _WRAPPED.pop()
            owner.set_truncation_and_padding = original
