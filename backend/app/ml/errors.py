"""Errors of the model layer."""

from __future__ import annotations


class ModelUnavailableError(RuntimeError):
    """A model could not be found or loaded; the message says where it looked and why."""

    def __init__(self, model_name: str, attempts: list[str], hint: str = ""):
        self.model_name = model_name
        self.attempts = list(attempts)
        lines = [f"model {model_name!r} is unavailable:"]
        lines += [f"  - {attempt}" for attempt in self.attempts]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))
