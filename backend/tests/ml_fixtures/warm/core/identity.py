"""What a warm server must share with its callers, and what it imported: run in the caller, the
server and the launcher.

What cannot be re-applied in a forked process — what the interpreter and the preloaded libraries
read once, at start-up or import (:data:`IMPORT_TIME_PREFIXES`) — is part of a server's
:class:`Identity`: a caller with other values gets a server of its own (one socket per identity).
After its imports a server writes its :class:`Manifest`: every file of every module it imported,
with sizes and modification times, which callers check before each run (a few milliseconds) to
replace a server whose files changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.machinery
import json
import marshal
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from .protocol import CannotRunWarm

#: Environment variables read once, by the interpreter at start-up (``PYTHON*``, locale, the dynamic
#: loader, malloc) or by a preloaded library at import (thread pools, the model hubs' offline and
#: cache settings, devices): a child cannot take the caller's values over, so they are part of the
#: server's identity. A variable read at import that is missing here is frozen at server start.
IMPORT_TIME_PREFIXES = (
    "PYTHON", "LC_", "LD_", "MALLOC_", "GLIBC_",
    "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "BLIS_", "VECLIB_", "NUMEXPR_", "NUMPY_",
    "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "HIP_", "ROCM_",
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "SAFETENSORS_", "USE_", "SQLALCHEMY_",
)  # fmt: skip
IMPORT_TIME_NAMES = (
    "HOME", "USER", "LOGNAME", "TMPDIR", "LANG", "XDG_CACHE_HOME", "DO_NOT_TRACK", "DISABLE_TELEMETRY", "ML_WARM_PRELOAD",
)  # fmt: skip
#: ... except these, which every child re-applies exactly (warning filters) or reads at use.
REAPPLIED = ("PYTHONWARNINGS", "PYTHONBREAKPOINT", "PYTHONSTARTUP")
#: This package's directory: a server runs the code of one checkout, so it is part of the identity.
CORE_DIR = str(Path(__file__).resolve().parent)


def read_at_import(name: str) -> bool:
    return name not in REAPPLIED and (name in IMPORT_TIME_NAMES or name.startswith(IMPORT_TIME_PREFIXES))


def interpreter_args() -> list[str]:
    """Command-line options that give a new interpreter this one's ``sys.flags`` and ``-X`` options
    (``-W`` aside: warning filters are re-applied in each child)."""
    args = [arg for arg in subprocess._args_from_interpreter_flags() if not arg.startswith("-W")]
    for name, value in sys._xoptions.items():
        option = name if value is True else f"{name}={value}"
        if option not in args:
            args += ["-X", option]
    return args


@dataclasses.dataclass(frozen=True)
class EnvironmentDefaults:
    """What a run's configuration puts into the environment unless the caller set it (the offline
    settings, the server's preload list): a library imported during a cold run would read them, so
    the server imports with them and they count in its identity. Passed to a worker launcher as
    ``NAME=VALUE`` arguments."""

    variables: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, variables: Mapping[str, str]) -> EnvironmentDefaults:
        return cls(tuple(variables.items()))

    def under(self, environ: Mapping[str, str]) -> dict[str, str]:
        """``environ`` with these where it has none."""
        return {**dict(self.variables), **environ}

    def as_arguments(self) -> list[str]:
        return [f"{name}={value}" for name, value in self.variables]

    @classmethod
    def from_arguments(cls, arguments: Iterable[str]) -> EnvironmentDefaults:
        return cls(tuple(tuple(argument.split("=", 1)) for argument in arguments))


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a server must share with its callers: the interpreter, its options, the CPUs it may
    use (OpenMP sizes its pool from them at load), the variables read at import, and this code."""

    settings: dict

    @classmethod
    def of_this_process(cls, env_defaults: EnvironmentDefaults = EnvironmentDefaults()) -> Identity:
        variables = {
            name: value
            for name, value in sorted(env_defaults.under(os.environ).items())
            if read_at_import(name) and not (name.startswith("PYTHON") and not value)  # empty = unset, for Python
        }
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return cls(
            {
                "executable": sys.executable,
                "version": sys.version,
                "flags": list(sys.flags),
                "xoptions": sorted((name, str(value)) for name, value in sys._xoptions.items()),
                "affinity": affinity,
                "environment": variables,
                "code": CORE_DIR,
            }
        )

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]

    def difference(self, other: dict) -> str:
        """The first setting where ``other`` differs, in words."""
        for name, mine in self.settings.items():
            theirs = other.get(name)
            if name == "environment" and theirs != mine:
                variable = next(v for v in sorted({*mine, *theirs}) if mine.get(v) != theirs.get(v))
                return f"{variable}={theirs.get(variable)!r} there, {mine.get(variable)!r} here"
            if theirs != mine:
                return f"{name}: {theirs!r} there, {mine!r} here"
        return "no difference"

    @staticmethod
    def server_environment(env_defaults: EnvironmentDefaults) -> dict[str, str]:
        """This environment with ``env_defaults`` where unset, less what each child re-applies (a
        server importing under PYTHONWARNINGS=error would fail its imports)."""
        return env_defaults.under({name: value for name, value in os.environ.items() if name not in REAPPLIED})


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a server wrote after its imports: who it is and the files its modules came from."""

    server_id: str
    pid: int
    identity: dict
    files: list[str]
    stats: list[tuple[int, int]]
    top_level: frozenset[str]
    sys_path: list[str]

    @staticmethod
    def of_this_server(server_id: str, identity: Identity) -> Manifest:
        files = {sys.executable}
        top_level = set()
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if isinstance(file, str) and os.path.isabs(file):
                files.add(file)
                top_level.add(name.partition(".")[0])
        paths = sorted(path for path in files if os.path.exists(path))
        stats = [(info.st_mtime_ns, info.st_size) for info in map(os.stat, paths)]
        top_level.discard("__main__")
        return Manifest(server_id, os.getpid(), identity.settings, paths, stats, frozenset(top_level), list(sys.path))

    def write(self, path: Path) -> None:
        data = dataclasses.asdict(self) | {"top_level": sorted(self.top_level)}
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(marshal.dumps(data))
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        try:
            data = marshal.loads(path.read_bytes())
            return cls(**data | {"top_level": frozenset(data["top_level"])})
        except (OSError, EOFError, ValueError, TypeError, KeyError):
            return None

    def changed(self) -> str | None:
        """The first file that changed or went since the server imported it, in words."""
        try:
            if [(info.st_mtime_ns, info.st_size) for info in map(os.stat, self.files)] == self.stats:
                return None
        except OSError:
            pass
        for path, recorded in zip(self.files, self.stats):
            try:
                info = os.stat(path)
            except OSError:
                return f"{path} is gone"
            if (info.st_mtime_ns, info.st_size) != recorded:
                return f"{path} changed"
        return None

    def shadowed(self, caller_path: list[str]) -> str | None:
        """A module the server imported that this run's ``sys.path`` would take from elsewhere."""
        for directory in caller_path:
            if directory in self.sys_path:
                continue
            try:
                entries = os.listdir(directory or ".")
            except OSError:
                continue
            for entry in entries:
                name = next((entry[: -len(s)] for s in importlib.machinery.all_suffixes() if entry.endswith(s)), entry)
                if name not in self.top_level:
                    continue
                # A module file or a regular package shadows; a directory without __init__ does not.
                if name != entry or any(
                    os.path.exists(os.path.join(directory, entry, f"__init__{s}")) for s in importlib.machinery.all_suffixes()
                ):
                    return f"{entry} in {directory or os.getcwd()} would shadow the warm server's {name}"
        return None

    def check(self, identity: Identity, caller_path: list[str] | None = None, whose: str = "this interpreter's") -> None:
        """Whether a process of ``identity`` (with ``caller_path`` as its ``sys.path``) can be forked
        from this server; :class:`~.protocol.CannotRunWarm` says why not."""
        if self.identity != identity.settings:
            raise CannotRunWarm(f"the warm server cannot take {whose} settings ({identity.difference(self.identity)})")
        shadow = self.shadowed(caller_path) if caller_path is not None else None
        if shadow:
            raise CannotRunWarm(shadow)
