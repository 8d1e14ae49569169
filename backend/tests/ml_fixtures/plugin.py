"""The pytest hooks of the ML fixture library; the fixtures themselves live in the root conftest."""

from __future__ import annotations

import os

import pytest

from app import config as app_config
from app.ml import LoadedModel, ModelUnavailableError
from ml_fixtures import guard
from ml_fixtures.cassettes import Cassettes
from ml_fixtures.catalog import KINDS, ModelKind
from ml_fixtures.options import Settings
from ml_fixtures.options import pytest_addoption as pytest_addoption  # noqa: F401 (a hook)
from ml_fixtures.pool import ModelKey, ModelPool
from ml_fixtures.recorder import LoadRecorder

POLICIES = ("unit", "integration")
MARKER = "use_real_models"
settings_key = pytest.StashKey[Settings]()
pool_key = pytest.StashKey[ModelPool]()
recorder_key = pytest.StashKey[LoadRecorder]()
cassettes_key = pytest.StashKey[Cassettes]()


class UnavailableModel(LoadedModel):
    """``(None, None, None)`` from a cached fixture whose model could not be had; ``.reason`` says why."""

    def __new__(cls, reason: str):
        self = super().__new__(cls, None, None, None)
        self.reason = reason
        return self


def pytest_configure(config: pytest.Config) -> None:
    # Model hubs are never reached from tests: the resolver uses local files only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Pinned for child processes too (pytester moves HOME), so models are built once per machine.
    if config.getoption("ml_model_cache_dir"):
        os.environ["ML_MODEL_CACHE_DIR"] = config.getoption("ml_model_cache_dir")
    os.environ.setdefault("ML_MODEL_CACHE_DIR", str(app_config.model_cache_dir()))
    settings = Settings.from_config(config)
    recorder = LoadRecorder(worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))
    config.stash[settings_key] = settings
    config.stash[recorder_key] = recorder
    config.stash[pool_key] = ModelPool(settings.memory_budget, on_load=recorder.timed_load, on_evict=recorder.evicted)
    config.stash[cassettes_key] = Cassettes(settings.cassette_dir, settings.record)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistReport(recorder), "ml-models-xdist")


def cached_fixture_scope(fixture_name: str, config: pytest.Config) -> str:
    """Module scope, or function scope under ``--ml-model-scope=function`` (a load per test)."""
    return "function" if config.getoption("ml_model_scope") == "function" else "module"


def pool_model(config: pytest.Config, kind: ModelKind, path: object = None) -> LoadedModel:
    """``kind``'s real model from the pool (loaded there on first use)."""
    settings = config.stash[settings_key]
    model = kind.model_name if path is None else f"{kind.model_name} @ {path}"
    key = ModelKey(model, settings.device or "auto", settings.dtype or "default")
    return config.stash[pool_key].acquire(key, lambda: kind.load_real(path, settings.device, settings.dtype))


def _marked(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARKER) is not None


def cached_model(request: pytest.FixtureRequest, kind: ModelKind, policy: str) -> LoadedModel:
    """What a cached fixture yields: the pooled model, or an :class:`UnavailableModel`."""
    item = request._pyfuncitem  # the test that set the fixture up, also under module scope
    request.config.stash[recorder_key].current_policy = policy
    if policy == "unit" and not _marked(item):
        pytest.fail(guard.blocked_message(item.nodeid, kind.fixture), pytrace=False)
    try:
        return pool_model(request.config, kind)
    except ModelUnavailableError as exc:
        return UnavailableModel(f"{kind.fixture}: {exc}")


def route_model_loads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """Point each service's loading seam at fakes, or at the pool for tests on real models."""
    if policy not in POLICIES:
        raise pytest.UsageError(f"ml_model_policy must be one of {POLICIES}, got {policy!r}")
    item, config = request.node, request.config
    config.stash[recorder_key].current_policy = policy
    used = [kind for kind in KINDS if kind.fixture in request.fixturenames]
    for kind in used:
        loaded = request.getfixturevalue(kind.fixture)
        if isinstance(loaded, UnavailableModel):
            pytest.skip(loaded.reason)
    cassettes = config.stash[cassettes_key]
    if _marked(item) or used:
        cassette = cassettes.path_for(item.path, config.rootpath)
        for kind in KINDS:
            monkeypatch.setattr(kind.service, "_load_model", lambda self, k=kind: pool_model(config, k, k.service_path(self)))
            record = cassettes.recorder(cassette, kind.source)
            if record is not None:
                _record_model_calls(monkeypatch, kind, record)
        return
    for kind in KINDS:
        replay = cassettes.replay_index(kind.source)
        monkeypatch.setattr(kind.service, "_load_model", lambda self, k=kind, r=replay: k.make_fake(r))
    if policy == "unit":
        guard.install(request, monkeypatch)
        request.getfixturevalue("socket_disabled")


def _record_model_calls(monkeypatch: pytest.MonkeyPatch, kind: ModelKind, record) -> None:
    """Wrap the service's model call so that each text and its raw output land in the cassette."""
    call = getattr(kind.service, kind.model_call)

    def recording(self, texts):
        rows = call(self, texts)
        if kind.service_path(self) is None:  # only the default model has a cassette entry
            for text, row in zip(texts, rows):
                record(text, kind.recordable(self, row))
        return rows

    monkeypatch.setattr(kind.service, kind.model_call, recording)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group tests by the cached model they use, so that ``--dist loadgroup`` loads it once."""
    for item in items:
        for kind in KINDS:
            if kind.fixture in getattr(item, "fixturenames", ()) and not item.get_closest_marker("xdist_group"):
                item.add_marker(pytest.mark.xdist_group(kind.name))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    recorder = item.config.stash[recorder_key]
    recorder.current_test = item.nodeid
    try:
        return (yield)
    finally:
        recorder.current_test = recorder.current_policy = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        scope = item.config.stash[settings_key].scope
        module_ends = nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None)
        if scope == "function" or (scope == "module" and module_ends):
            item.config.stash[pool_key].clear()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    recorder = config.stash[recorder_key]
    config.stash[pool_key].clear()
    cassettes = config.stash[cassettes_key]
    recorder.cassettes_written = [str(p) for p in cassettes.save()]
    recorder.stale_cassettes = cassettes.stale([kind.source for kind in KINDS])
    recorder.finish()
    if hasattr(config, "workeroutput"):
        config.workeroutput["ml_model_report"] = recorder.to_dict()
    elif config.stash[settings_key].report_path:
        recorder.write_json(config.stash[settings_key].report_path)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    terminalreporter.section("ML model loads")
    for line in config.stash[recorder_key].summary_lines():
        terminalreporter.write_line(line)


class _XdistReport:
    """Collects the workers' load reports on the controller."""

    def __init__(self, recorder: LoadRecorder):
        self.recorder = recorder

    def pytest_testnodedown(self, node, error) -> None:
        report = getattr(node, "workeroutput", {}).get("ml_model_report")
        if report:
            self.recorder.merge(report)
