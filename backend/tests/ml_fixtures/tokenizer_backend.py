"""The checkable state of a pooled fast tokenizer's Rust backend (part of the modification check, ``mutation.py``)."""

from __future__ import annotations

from typing import Any

from ml_fixtures import tokenizer_calls


class TokenizerBackend:
    """The fast tokenizer's Rust backend: added tokens, components, truncation and padding.

    transformers sets the backend's truncation and padding on every call of the tokenizer from
    that call's arguments, and leaves them so: they change in honest use. Those left by a call are
    recorded (``tokenizer_calls.py``); a state that no call left was
    set directly (``backend_tokenizer.enable_truncation(...)``) and is reported. Either way
    :meth:`reset` puts back the state at load after each test.
    """

    COMPONENTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
    MODEL_SETTINGS = (
        "unk_token", "continuing_subword_prefix", "max_input_chars_per_word", "dropout", "fuse_unk", "byte_fallback",
    )

    @staticmethod
    def applies(tokenizer: Any) -> bool:
        return tokenizer_calls.calls_owner(tokenizer) is not None and hasattr(vars(tokenizer).get("_tokenizer"), "truncation")

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.loaded = self._calls_state()
        self.state = self._state()

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
        calls, left = self._calls_state(), tokenizer_calls.left_by_calls(self.tokenizer)
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
        tokenizer_calls.forget_calls(self.tokenizer)


def _component_state(component: Any) -> bytes | None:
    return None if component is None else component.__getstate__()
