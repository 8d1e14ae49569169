"""Blocking real model loads in the unit trees, in the manner of pytest-django's database blocker.

In a test under ``ml_model_policy == "unit"`` that is not marked ``use_real_models``, the
application's loaders, ``torch.load``, transformers' ``from_pretrained`` and FlagEmbedding's
``BGEM3FlagModel`` fail the test with a message naming the marker, instead of passing slowly.
Libraries that are not imported yet are patched the moment they are, so guarding costs a
unit run no import.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

#: module -> attributes (``Class.method`` or ``function``) that load model weights.
LOADERS = {
    "app.ml.loading": ("load_sparse_embedding_model", "load_classification_model"),
    "torch": ("load",),
    "transformers.modeling_utils": ("PreTrainedModel.from_pretrained",),
    "transformers.models.auto.auto_factory": ("_BaseAutoModelClass.from_pretrained",),
    "FlagEmbedding.inference.embedder.encoder_only.m3": ("M3Embedder.__init__",),
}


def blocked_message(test: str, what: str) -> str:
    return (
        f"Real model load not allowed in this test: {test} called {what}.\n"
        "Tests in backend/tests/unit/ and backend/tests/services/ run on fake models "
        '(their conftest sets ml_model_policy to "unit").\n'
        "Mark the test with @pytest.mark.use_real_models to load real models, "
        "or move it to backend/tests/integration/."
    )


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after one of ``patches``' modules is first imported."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]):
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch: Callable[[ModuleType], None]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)


def _blocking(original, what: str, test: str, active: Callable[[], bool]):
    """A stand-in that fails while the guard is active and defers to ``original`` after.

    Deferring matters: a library may copy a loader while it is patched (transformers copies
    ``from_pretrained`` into each Auto class as it creates it), and that copy outlives the test.
    """
    if isinstance(original, (classmethod, staticmethod)):
        return type(original)(_blocking(original.__func__, what, test, active))

    @functools.wraps(original)
    def blocked(*args, **kwargs):
        if active():
            pytest.fail(blocked_message(test, what), pytrace=False)
        return original(*args, **kwargs)

    return blocked


def install(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block every loader in :data:`LOADERS` for the current test (undone with ``monkeypatch``)."""
    test, active = request.node.nodeid, [True]
    request.addfinalizer(active.clear)

    def patch_module(module: ModuleType) -> None:
        for attribute in LOADERS[module.__name__]:
            owner_name, _, name = attribute.rpartition(".")
            owner = getattr(module, owner_name) if owner_name else module
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            monkeypatch.setattr(owner, name, _blocking(original, f"{module.__name__}.{attribute}", test, lambda: bool(active)))

    pending = {}
    for module_name in LOADERS:
        module = sys.modules.get(module_name)
        if module is not None:
            patch_module(module)
        else:
            pending[module_name] = patch_module
    monkeypatch.setattr(sys, "meta_path", [_PatchAfterImport(pending), *sys.meta_path])
