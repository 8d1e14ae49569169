"""A finder in ``sys.meta_path`` that asks the finders after it for a module and wraps the loader they give.

The guard (patching a loader module as it is imported) and the dependency record (importing a
third-party module with the tracer paused) each install one. Each asks the others, so without care
they would ask each other forever: a finder passes over a name it is already looking for.
"""

from __future__ import annotations

import importlib.abc
import sys


class WrappingFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._looking: set[str] = set()

    def spec_from_the_others(self, fullname, path, target=None):
        """The spec the rest of ``sys.meta_path`` finds for ``fullname``, or None (also while asked already)."""
        if fullname in self._looking:
            return None
        self._looking.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    return spec
            return None
        finally:
            self._looking.discard(fullname)
