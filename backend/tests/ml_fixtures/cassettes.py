"""Recorded model responses, in the manner of VCR.py cassettes.

An integration run with ``--ml-record=once|rewrite`` records every model call that a service
makes on a real model — each input (a text, or a pair of texts) in, the raw model output out —
into one JSON cassette per test module; the model's ``ModelCall`` declaration says how. In every
run the fake models replay a recorded output where the cassettes hold
that text, and fall back to their deterministic made-up output otherwise; under
``--ml-replay=strict`` a text that no current cassette holds fails the test instead
(:class:`CassetteMissError`, in the manner of VCR's "can't overwrite existing cassette").

A cassette stores each model's fingerprint (a hash of its recipe for an embedded model, else
of its directory: weights, configuration, tokenizer) and what it was recorded with (the versions
of the project's ``environment_packages``, the device, the dtype). When the model in use has
another fingerprint, the cassette is stale: it is not replayed, the load report lists it, and
``--ml-record=once`` records it again. The maintenance modes (``verify``, ``accept``, ``prune``)
replay every cassette as recorded, stale or not: the entries the tests use are then the same
whichever model is in use, and verify measures how far that model's answers are from them.

Every replayed or recorded entry is noted per test (``usage.py``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import platform
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ml_fixtures.declaration import ModelSpec
from ml_fixtures.keys import cassette_key
from ml_fixtures.options import RecordMode, ReplayMode
from ml_fixtures.usage import EntryRef

VERSION = 1
#: Rounding keeps a re-record of an unchanged model an empty diff (batching moves the 7th digit).
DIGITS = 5
#: Longer texts are not recorded: they would bloat the cassette for little to replay.
MAX_TEXT = 1000


@functools.cache
def _directory_fingerprint(path: Path, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "recipe.json"):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def fingerprint(spec: ModelSpec) -> str | None:
    """The fingerprint of ``spec``'s default model as it is on disk now, or None where it is not there.

    A model built from a recipe is known by it (``recipe.json``: seed, constants, input hashes):
    fine-tuning the same recipe on another CPU moves the weights' last bits, not the model.
    Any other directory is known by the bytes of its files.
    """
    path = spec.locate()
    if path is None:
        return None
    recipe = path / "recipe.json"
    if recipe.is_file():
        return "recipe:" + hashlib.sha256(recipe.read_bytes()).hexdigest()[:16]
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()))
    return _directory_fingerprint(path, stamp)


def environment(packages: Iterable[str], device: str | None, dtype: str | None) -> dict[str, str]:
    """What outputs are recorded with: the packages' versions, the device (a GPU's name), the dtype."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    device = device or "cpu"
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        device = f"{device} ({platform.machine()})"
    return {**versions, "device": device, "dtype": dtype or "default"}


def dump(cassette: dict) -> str:
    """A cassette's text: sorted keys, two-space indents, one file per test module (what is read back byte for byte)."""
    return json.dumps(cassette, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rounded(value):
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


class CassetteMissError(LookupError):
    """A fake model under ``--ml-replay=strict`` was asked for a text that no current cassette holds."""


@dataclass(frozen=True)
class Replay:
    """What one fake model answers from the cassettes, for one test: ``get(text)`` -> recorded output or None."""

    calls: Mapping[str, object]
    mode: ReplayMode = ReplayMode.FALLBACK
    model: str = ""
    #: The test asking, and the cassette its module records into (named in a strict miss).
    test: str = ""
    cassette: Path | None = None
    #: ``on_lookup(key, answer)``: each question a fake asked, with its answer (None: none recorded).
    on_lookup: Callable[[str, object], None] | None = None
    #: ``on_replay(key)`` after each recorded output handed out (the usage of the test).
    on_replay: Callable[[str], None] | None = None

    def get(self, call_input: str | tuple[str, ...] | None) -> object | None:
        """The recorded output for an input of the model call (a text, or a pair as a tuple), or None."""
        if self.mode is ReplayMode.NONE:
            return None
        key = None if call_input is None else cassette_key(call_input)
        if self.on_lookup is not None and key is not None:
            self.on_lookup(key, self.calls.get(key))
        if key in self.calls:
            if self.on_replay is not None:
                self.on_replay(key)
            return self.calls[key]
        if self.mode is ReplayMode.STRICT:
            raise CassetteMissError(self._miss_message(key))
        return None

    def _miss_message(self, text: str | None) -> str:
        where = f"{self.cassette}" + ("" if self.cassette and self.cassette.exists() else " (not recorded yet)")
        return (
            f"--ml-replay=strict: no current cassette holds a recorded output of {self.model} for {text!r}, "
            f"and strict replay never makes one up.\n"
            f"Cassette of this test: {where}\n"
            f"Record it from the real model: mark the test @pytest.mark.use_real_models and run\n"
            f"    pytest {self.test} --ml-record=once\n"
            f"(or replay with fallback, the default: --ml-replay=fallback)."
        )


class _ReplayIndex(Mapping):
    """:meth:`Cassettes.replay_index`, settling which cassettes are stale only once one of them holds
    an input asked for: the model's fingerprint is a look-up on disk (the Hugging Face cache's
    included, a third of a second), which a unit run whose inputs no cassette holds never needs."""

    def __init__(self, cassettes: Cassettes, spec: ModelSpec):
        self._cassettes, self._spec = cassettes, spec
        self._recorded = [
            entry["calls"] for cassette in cassettes._all().values() if (entry := cassette.get("models", {}).get(spec.model_name))
        ]
        self._current: dict[str, object] | None = None

    def settled(self) -> dict[str, object]:
        """The index itself (which cassettes are stale looked up now, if not yet)."""
        if self._current is None:
            self._current = self._cassettes._index(self._spec)
        return self._current

    def get(self, key: str, default: object = None) -> object:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return any(key in calls for calls in self._recorded) and key in self.settled()

    def __getitem__(self, key: str) -> object:
        return self.settled()[key]

    def __iter__(self):
        return iter(self.settled())

    def __len__(self) -> int:
        return len(self.settled())


class Cassettes:
    """Every cassette under one directory: the replay index, the recording, the stale list, the edits of accept and prune."""

    def __init__(
        self,
        directory: Path,
        mode: RecordMode,
        fingerprint_of: Callable[[ModelSpec], str | None] = fingerprint,
    ):
        self.directory, self.mode = Path(directory), mode
        self._fingerprint_of = fingerprint_of
        self._fingerprints: dict[str, str | None] = {}
        self._loaded: dict[Path, dict] | None = None
        self._recording: dict[Path, dict] = {}
        self._entries: dict[tuple[Path, str], dict | None] = {}
        self._indexes: dict[str, _ReplayIndex] = {}
        #: Model -> key -> the cassette (relative) whose output the index holds.
        self._sources: dict[str, dict[str, str]] = {}
        self._paths: dict[Path, Path] = {}

    def current_fingerprint(self, spec: ModelSpec) -> str | None:
        if spec.model_name not in self._fingerprints:
            self._fingerprints[spec.model_name] = self._fingerprint_of(spec)
        return self._fingerprints[spec.model_name]

    def _all(self) -> dict[Path, dict]:
        if self._loaded is None:
            self._loaded = {
                path: json.loads(path.read_text(encoding="utf-8")) for path in sorted(self.directory.rglob("*.json"))
            }
        return self._loaded

    def relative(self, path: Path) -> str:
        """A cassette's name in an :class:`EntryRef`: its path under the directory, with ``/``."""
        return path.relative_to(self.directory).as_posix()

    def is_stale(self, entry: dict, spec: ModelSpec) -> bool:
        current = self.current_fingerprint(spec)
        return current is not None and entry.get("fingerprint") != current

    def replay_index(self, spec: ModelSpec) -> Mapping[str, object]:
        """Input -> recorded output of ``spec``'s model, from every cassette that is not stale (every one under
        the maintenance modes); where several hold an input, the last by path."""
        if spec.model_name not in self._indexes:
            self._indexes[spec.model_name] = _ReplayIndex(self, spec)
        return self._indexes[spec.model_name]

    def _index(self, spec: ModelSpec) -> dict[str, object]:
        index, sources = {}, {}
        for path, cassette in self._all().items():
            entry = cassette.get("models", {}).get(spec.model_name)
            if entry and (self.mode.maintains or not self.is_stale(entry, spec)):
                index.update(entry["calls"])
                sources.update(dict.fromkeys(entry["calls"], self.relative(path)))
        self._sources[spec.model_name] = sources
        return index
        return self._indexes[spec.model_name]

    def replayed(self, spec: ModelSpec, key: str) -> EntryRef:
        """The entry whose output the replay index holds for ``key``."""
        self.replay_index(spec).settled()
        return EntryRef(self._sources[spec.model_name][key], spec.model_name, key)

    def held(self, cassette_path: Path, spec: ModelSpec) -> dict[str, object]:
        """The calls of ``spec``'s model that the cassette held when the run began."""
        return self._all().get(cassette_path, {}).get("models", {}).get(spec.model_name, {}).get("calls", {})

    def entries(self) -> set[EntryRef]:
        """Every entry of every cassette, as the run began."""
        return {
            EntryRef(self.relative(path), model, key)
            for path, cassette in self._all().items()
            for model, entry in cassette.get("models", {}).items()
            for key in entry.get("calls", {})
        }

    def unused(self, used: set[EntryRef]) -> list[EntryRef]:
        """The entries no test used, sorted."""
        return sorted(self.entries() - used)

    def models_in(self, cassette: str) -> dict[str, dict]:
        """A cassette's model entries (``fingerprint``, ``calls``, ``recorded_with``) as the run began, by model name."""
        return self._all().get(self.directory / cassette, {}).get("models", {})

    def stale(self, specs: tuple[ModelSpec, ...]) -> list[str]:
        """Cassettes recorded from another version of a model than the one in use (re-recorded ones excepted).

        Only the models this run replayed a cassette of or recorded count: looking up another's fingerprint
        (the Hugging Face cache included) would cost a run that used none of them its time. None under
        the maintenance modes: they replay every cassette, and the drift report shows both fingerprints.
        """
        if self.mode.maintains:
            return []
        specs = tuple(spec for spec in specs if spec.model_name in self._fingerprints)
        return [
            f"{path.relative_to(self.directory)} ({spec.model_name})"
            for path, cassette in self._all().items()
            for spec in specs
            if spec.model_name in cassette.get("models", {})
            and self.is_stale(cassette["models"][spec.model_name], spec)
            and not self._entries.get((path, spec.model_name))
        ]

    def path_for(self, module_path: Path, rootpath: Path) -> Path:
        """One cassette per test module, mirroring its path below the tests' root."""
        if module_path not in self._paths:  # asked for each test: worked out once per module
            try:
                relative = module_path.relative_to(self.directory.parent)
            except ValueError:
                relative = module_path.relative_to(rootpath)
            self._paths[module_path] = self.directory / relative.with_suffix(".json")
        return self._paths[module_path]

    def recording(
        self, cassette_path: Path, spec: ModelSpec, environment: Callable[[], dict[str, str]]
    ) -> Callable[[str, object], bool] | None:
        """A ``record(key, output) -> recorded?`` for one model in one cassette, or None if nothing is to be recorded.

        ``once`` records a model's calls where its cassette lacks them or is stale; ``rewrite`` always.
        The decision is taken once per run, so a module's calls all land in one fresh entry, with
        ``environment()`` as what it was recorded with.
        """
        if not self.mode.records:
            return None
        key = (cassette_path, spec.model_name)
        if key not in self._entries:
            current = self.current_fingerprint(spec)
            existing = self._all().get(cassette_path, {"version": VERSION, "models": {}})
            entry = existing["models"].get(spec.model_name)
            if self.mode is RecordMode.REWRITE or entry is None or entry.get("fingerprint") != current:
                cassette = self._recording.setdefault(cassette_path, copy.deepcopy(existing))
                cassette["models"][spec.model_name] = {"fingerprint": current, "calls": {}}
                self._entries[key] = cassette["models"][spec.model_name]
            else:
                self._entries[key] = None
        entry = self._entries[key]
        if entry is None:
            return None

        def record(text: str, output: object) -> bool:
            if len(text) > MAX_TEXT:
                return False
            entry.setdefault("recorded_with", environment())
            entry["calls"].setdefault(text, rounded(output))
            return True

        return record

    def edit(self, cassette: str) -> dict:
        """A cassette's content to change in place (accept, prune); :meth:`save` writes it."""
        path = self.directory / cassette
        if path not in self._recording:
            self._recording[path] = copy.deepcopy(self._all()[path])
        return self._recording[path]

    def prune(self, unused: Iterable[EntryRef]) -> None:
        """Remove these entries; :meth:`save` drops a model left without one, and a cassette left empty."""
        for ref in unused:
            del self.edit(ref.cassette)["models"][ref.model]["calls"][ref.key]

    def save(self) -> list[Path]:
        """Write what was recorded or edited (every other byte as it was read); returns the changed files."""
        written = []
        for path, cassette in self._recording.items():
            cassette["models"] = {name: entry for name, entry in cassette["models"].items() if entry["calls"]}
            if not cassette["models"]:
                if path.exists():  # emptied by prune
                    path.unlink()
                    written.append(path)
                continue
            text = dump(cassette)
            if path.exists() and path.read_text(encoding="utf-8") == text:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
        return written
