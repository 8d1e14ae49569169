"""Where each service's loading seam leads for the test being run: fakes, the pool, or the service's own.

The seams are patched once a run, before its first test, each to a dispatcher that follows the
current test's route; per test only the route changes, not the classes. Where no route is set
(between tests, or a fixture that makes a service before the routing fixture runs) the seam is the
service's own, as without the library. A test or fixture that patches a seam itself (a private copy,
its own ``monkeypatch``) replaces the dispatcher while its patch lasts, and its undo puts it back:
patched before any test's fixtures, the dispatchers are under every patch a test or fixture makes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from ml_fixtures.declaration import LoadedModel, ModelSpec

#: ``route(spec, service)``: what ``spec``'s seam returns for ``service`` in the current test.
Route = Callable[[ModelSpec, object], LoadedModel]


class SeamRoutes:
    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs = tuple(specs)
        self._route: Route | None = None
        self._patches: pytest.MonkeyPatch | None = None

    def install(self) -> None:
        """Patch the seams for the run, before its first test (``pytest_runtestloop``)."""
        if self._patches is not None:
            return
        self._patches = pytest.MonkeyPatch()
        for spec in self._specs:
            own = getattr(spec.service, spec.seam)

            def dispatch(service, spec=spec, own=own):
                route = self._route
                return own(service) if route is None else route(spec, service)

            self._patches.setattr(spec.service, spec.seam, dispatch)

    def route(self, request: pytest.FixtureRequest, route: Route) -> None:
        """Send every seam along ``route`` until ``request``'s test ends."""
        self.install()
        self._route = route
        request.addfinalizer(self._clear)

    def release(self) -> None:
        """Give every service its own seam back: the run's end (``config.add_cleanup``)."""
        if self._patches is not None:
            self._patches.undo()
            self._patches = None
        self._route = None

    def _clear(self) -> None:
        self._route = None
