"""How a model call's input is written as a cassette key, and read back."""

from __future__ import annotations

import json
from collections.abc import Sequence


def cassette_key(call_input: str | Sequence[str]) -> str:
    """How an input is written in a cassette: a text as it is, a pair or other tuple as a JSON list."""
    return call_input if isinstance(call_input, str) else json.dumps(list(call_input), ensure_ascii=False)


def input_of_key(key: str) -> str | tuple[str, ...]:
    """The input a cassette key was written from: a JSON list of texts reads back as a tuple, anything else is the text.

    A text that is itself a JSON list of strings reads back as a tuple: the one ambiguity of the format, which
    only a model whose inputs are single texts could meet (its ``calls_for`` then takes the keys as they are).
    """
    if key.startswith("["):
        try:
            value = json.loads(key)
        except ValueError:
            return key
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
    return key
