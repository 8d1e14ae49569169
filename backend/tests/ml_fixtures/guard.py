"""Blocking real model loads in the unit trees, in the manner of pytest-django's ``django_db_blocker``.

While a test under ``ml_model_policy == "unit"`` that is not marked ``use_real_models`` runs,
the :class:`ModelBlocker` is blocked, and the project's declared loaders, ``torch.load``,
transformers' ``from_pretrained`` and FlagEmbedding's models fail the test with a message naming
the marker, instead of passing slowly. A fixture that legitimately needs a
real load takes ``ml_model_blocker`` and loads inside ``with ml_model_blocker.unblock():``.
The loaders are patched once a run, before its first test, into stand-ins that defer to them while
nothing is blocked. Libraries that are not imported yet are patched the moment they are (one import
hook in ``sys.meta_path`` for the run), so guarding costs a unit run no import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from ml_fixtures.import_hooks import WrappingFinder

#: module -> attributes (``Class.method`` or ``function``) of the ML libraries that load model weights;
#: a project's declared loaders are added to these (:func:`loaders_of`).
LIBRARY_LOADERS = {
    "torch": ("load",),
    "transformers.modeling_utils": ("PreTrainedModel.from_pretrained",),
    "transformers.models.auto.auto_factory": ("_BaseAutoModelClass.from_pretrained",),
    "FlagEmbedding.inference.embedder.encoder_only.m3": ("M3Embedder.__init__",),
    "FlagEmbedding.inference.reranker.encoder_only.base": ("BaseReranker.__init__",),
}
MARKER = "use_real_models"


def loaders_of(project) -> dict[str, tuple[str, ...]]:
    """What the guard blocks for ``project``: the libraries' loaders, each model's loader, its extra ones."""
    loaders = {module: list(attributes) for module, attributes in LIBRARY_LOADERS.items()}
    targets = [spec.loader_target for spec in project.models]
    targets += [tuple(target.split(":", 1)) for target in project.extra_loaders]
    for module, attribute in targets:
        loaders.setdefault(module, [])
        if attribute not in loaders[module]:
            loaders[module].append(attribute)
    return {module: tuple(attributes) for module, attributes in loaders.items()}


@dataclass(frozen=True)
class BlockedTest:
    """Why loads are blocked: which test, in which directory, under which policy."""

    nodeid: str
    directory: str
    policy: str

    @classmethod
    def of(cls, item: pytest.Item, policy: str) -> BlockedTest:
        return cls(item.nodeid, _directory_shown(item.path, item.config.rootpath), str(policy))

    def message(self, what: str) -> str:
        return (
            f"Real model load not allowed in this test: {self.nodeid} called {what}.\n"
            f'Tests in {self.directory} run on fake models: ml_model_policy is "{self.policy}" there.\n'
            f"Mark the test with @pytest.mark.{MARKER} to load real models, or move it to a tree whose "
            'ml_model_policy is "integration"; a fixture that must load one can do so inside '
            "`with ml_model_blocker.unblock():`."
        )


class ModelBlocker:
    """Whether real model loads are allowed now: the state behind the guard (``ml_model_blocker``).

    ``block(test)`` and ``unblock()`` push a state, ``restore()`` pops it; both return a context
    manager that restores on exit. Outside any test nothing is blocked.
    """

    def __init__(self, loaders: dict[str, tuple[str, ...]] | None = None) -> None:
        #: module -> attributes that load model weights (:func:`loaders_of`).
        self.loaders = dict(LIBRARY_LOADERS if loaders is None else loaders)
        self._history: list[BlockedTest | None] = []
        self._hook = _PatchAfterImport()
        #: The loaders' stand-ins, from :meth:`install` (before the first test) to :meth:`release`.
        self._patches: pytest.MonkeyPatch | None = None
        self._imports_seen = -1

    @property
    def blocked(self) -> BlockedTest | None:
        """The test that loads are blocked for, or None while they are allowed."""
        return self._history[-1] if self._history else None

    @property
    def is_blocked(self) -> bool:
        """True while real loads are blocked."""
        return self.blocked is not None

    @property
    def unblocked(self) -> bool:
        """True inside ``unblock()``: loads are allowed on purpose, whatever the test."""
        return bool(self._history) and self._history[-1] is None

    def block(self, test: BlockedTest) -> contextlib.AbstractContextManager[None]:
        self._history.append(test)
        return self._restoring()

    def unblock(self) -> contextlib.AbstractContextManager[None]:
        """Allow real loads until the ``with`` block ends (or :meth:`restore`)."""
        self._history.append(None)
        return self._restoring()

    def restore(self) -> None:
        self._history.pop()

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.restore()

    def check(self, what: str) -> None:
        """Fail the current test if loads are blocked (the stand-ins call this before loading)."""
        if self.blocked is not None:
            pytest.fail(self.blocked.message(what), pytrace=False)

    def install(self) -> None:
        """Patch the loaders for the run, before its first test (``pytest_runtestloop``).

        The stand-ins stay until :meth:`release`: they defer to the real loader while nothing is
        blocked, so a run patches once rather than per test. Before any test's fixtures, so that a
        fixture's own patch of a loader goes on top of them and its undo puts them back.
        """
        if self._patches is None:
            self._patches = pytest.MonkeyPatch()
            sys.meta_path.insert(0, self._hook)
        self._patch()

    def guard_test(self, request: pytest.FixtureRequest, test: BlockedTest) -> None:
        """Block loads for the rest of ``request``'s test, every loader in :attr:`loaders` patched."""
        self.install()
        self.block(test)
        request.addfinalizer(self.restore)

    def release(self) -> None:
        """Put every loader back and take the import hook away: the run's end (``config.add_cleanup``)."""
        if self._patches is not None:
            self._patches.undo()
            self._patches = None
            sys.meta_path.remove(self._hook)
            self._hook.patches.clear()
        self._imports_seen = -1

    def _patch(self) -> None:
        """Patch the loaders again only if a module was imported since: it may bring a subclass with its
        own copy of a loader. A loader module not imported yet is patched as it is (the hook)."""
        if self._hook.imports == self._imports_seen:
            return
        self._imports_seen = self._hook.imports
        for module_name in self.loaders:
            module = sys.modules.get(module_name)
            if module is not None:
                self._patch_module(module)
            else:
                self._hook.patches[module_name] = self._patch_module

    def _patch_module(self, module: ModuleType) -> None:
        self._hook.patches.pop(module.__name__, None)
        for attribute in self.loaders[module.__name__]:
            owner_name, _, name = attribute.rpartition(".")
            what = f"{module.__name__}.{attribute}"
            # Subclasses that carry their own copy (transformers' Auto classes) are patched too.
            owners = _with_own(getattr(module, owner_name), name) if owner_name else [module]
            for owner in owners:
                current = owner.__dict__[name]
                if _blocker_of(current) is not self:
                    self._patches.setattr(owner, name, _blocking(current, what, self))


class _PatchAfterImport(WrappingFinder):
    """Runs ``patch(module)`` right after one of ``patches``' modules is first imported; counts imports."""

    def __init__(self) -> None:
        super().__init__()
        self.patches: dict[str, Callable[[ModuleType], None]] = {}
        #: Modules looked for since the hook went in: a new one may bring a subclass with a loader of its own.
        self.imports = 0

    def find_spec(self, fullname, path, target=None):
        self.imports += 1
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = self.spec_from_the_others(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable[[ModuleType], None]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


@functools.cache  # every test of a module asks (BlockedTest.of runs for each unit test)
def _directory_shown(module_path: Path, rootpath: Path) -> str:
    """The test module's directory as messages show it: below the rootdir, with a trailing slash."""
    try:
        directory = module_path.parent.relative_to(rootpath)
    except ValueError:
        directory = module_path.parent
    return f"{directory.as_posix()}/"


def _with_own(cls: type, name: str) -> list[type]:
    """``cls`` and every subclass of it whose own ``__dict__`` defines ``name``."""
    found, todo, seen = [], [cls], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if name in current.__dict__:
            found.append(current)
        todo += current.__subclasses__()
    return found


def _blocking(original, what: str, blocker: ModelBlocker):
    """A stand-in that fails while ``blocker`` blocks and defers to ``original`` otherwise.

    Deferring matters: a library may copy a loader while it is patched (transformers copies
    ``from_pretrained`` into each Auto class as it creates it), and that copy outlives the test.
    """
    if isinstance(original, (classmethod, staticmethod)):
        return type(original)(_blocking(original.__func__, what, blocker))

    constructor = what.endswith(".__init__")

    @functools.wraps(original)
    def blocked(*args, **kwargs):
        if constructor and blocker.is_blocked:
            _disarm(args[0])
        blocker.check(what)
        return original(*args, **kwargs)

    blocked.ml_model_blocker = blocker
    return blocked


def _blocker_of(loader) -> ModelBlocker | None:
    """The blocker whose stand-in ``loader`` is (an in-process pytester run's blocker wraps its caller's)."""
    return getattr(getattr(loader, "__func__", loader), "ml_model_blocker", None)


@functools.cache
def _refused(cls: type) -> type:
    """``cls`` without its finalizer: a subclass of the same layout whose ``__del__`` does nothing."""
    return type(f"Refused{cls.__name__}", (cls,), {"__slots__": (), "__del__": lambda self: None, "__module__": cls.__module__})


def _disarm(instance: object) -> None:
    """Take the finalizer away from an instance whose ``__init__`` the guard refuses.

    Its class's ``__del__`` would run on attributes ``__init__`` never set (FlagEmbedding's
    ``AbsEmbedder.__del__`` reads ``self.pool``) and raise during a later garbage collection. On
    CPython 3.11 pytest's hook that formats such an exception parses source, which corrupts any
    ``ast.parse`` the collection interrupted: a conftest import elsewhere fails with "AST
    constructor recursion depth mismatch". Blocking ``__new__`` instead is no way out: a class
    whose ``__new__`` was set and deleted again refuses arguments from then on.
    """
    if getattr(type(instance), "__del__", None) is not None:
        instance.__class__ = _refused(type(instance))
