"""The declared models' fingerprints, remembered across runs with what they were computed from.

A fingerprint (``cassettes.fingerprint``) costs the project's resolver its recipe: reading and
hashing the datasets the embedded models are built from, a tenth of a second or more. Each one is
kept in the record with the files its computation opened (an audit hook sees them), their sizes
and modification times, and the environment variables that steer model resolution; while those
are the same, the kept fingerprint is the fingerprint. A model that was not on disk is looked for again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

from ml_fixtures.affected.recorder import capture_opened

#: Environment variables that can change where a model is found or what it is. Not the ones a library sets
#: for itself as it is imported (torch's TORCHINDUCTOR_CACHE_DIR): a run that imported it would never match
#: the memo of one that did not (a collection-only --ml-affected run).
RESOLUTION_VARIABLES = re.compile(r"MODEL|^HF_|HUGGINGFACE|^TRANSFORMERS_|^TORCH_HOME$|^XDG_CACHE_HOME$|^HOME$")
#: Files opened while a fingerprint is computed that are code, not the model's inputs (and lock files).
NOT_INPUTS = (".py", ".pyc", ".so", ".zip", ".lock", "/METADATA")


def _environment() -> str:
    variables = sorted((k, v) for k, v in os.environ.items() if RESOLUTION_VARIABLES.search(k))
    return hashlib.blake2b(json.dumps(variables).encode(), digest_size=8).hexdigest()


def _stat(path: str) -> list[int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_mtime_ns, info.st_size]


class Fingerprints:
    """``fingerprint(spec)`` of each model, once per run, from the memo where its inputs are unchanged."""

    def __init__(self, compute: Callable[[object], str | None], memo: Callable[[], dict]):
        self._compute = compute
        self._memo_source = memo
        self._memo: dict | None = None
        self.found: dict[str, str | None] = {}
        #: What to remember: model -> {"fingerprint", "environment", "inputs": {path: [mtime_ns, size]}}.
        self.remembered: dict[str, dict] = {}

    def __call__(self, spec) -> str | None:
        name = spec.model_name
        if name not in self.found:
            self.found[name] = self._from_memo(name) or self._computed(spec)
        return self.found[name]

    def _from_memo(self, name: str) -> str | None:
        if self._memo is None:
            self._memo = self._memo_source()
        kept = self._memo.get(name)
        if not kept or not kept["fingerprint"] or kept["environment"] != _environment():
            return None
        if any(_stat(path) != state for path, state in kept["inputs"].items()):
            return None
        self.remembered[name] = kept
        return kept["fingerprint"]

    def _computed(self, spec) -> str | None:
        with capture_opened() as opened:
            fingerprint = self._compute(spec)
        # Modules imported on the way are not inputs: whether they load depends on what ran before.
        inputs = {
            path: _stat(path)
            for path in sorted(opened)
            if not path.startswith(("/proc/", "/sys/", "/dev/")) and not path.endswith(NOT_INPUTS)
        }
        self.remembered[spec.model_name] = {"fingerprint": fingerprint, "environment": _environment(), "inputs": inputs}
        return fingerprint
