"""The pytest hooks of the ML fixture library; the fixtures themselves live in the root conftest."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import pytest

from app import config as app_config
from app.ml import LoadedModel, ModelUnavailableError
from ml_fixtures import warm
from ml_fixtures.cassettes import Cassettes, Replay
from ml_fixtures.catalog import KINDS, ModelKind
from ml_fixtures.guard import MARKER, BlockedTest, ModelBlocker
from ml_fixtures.load_report import LoadReport
from ml_fixtures.options import ModelScope, Policy, Settings
from ml_fixtures.options import pytest_addoption as pytest_addoption  # noqa: F401 (a hook)
from ml_fixtures.pool import ModelKey, ModelPool

settings_key = pytest.StashKey[Settings]()
pool_key = pytest.StashKey[ModelPool]()
load_report_key = pytest.StashKey[LoadReport]()
cassettes_key = pytest.StashKey[Cassettes]()
blocker_key = pytest.StashKey[ModelBlocker]()
build_lines_key = pytest.StashKey[logging.Handler]()
#: The test being run: module-scoped fixtures are set up on behalf of whichever test comes first.
current_item_key = pytest.StashKey["pytest.Item | None"]()
#: A fresh load into the pooled model's objects costs this much here (see ML_MODEL_OPTIMIZATION.md).
COPY_COST = "a fresh load of its own: about 0.25 s for the embedded models, 0.55 s at bge-m3 size"
#: Model hubs are never reached from tests: the resolver uses local files only. Set for every run
#: unless the caller set them; a warm server imports the hub's libraries with them too.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class UnavailableModel(LoadedModel):
    """``(None, None, None)`` from a cached fixture whose model could not be had; ``.reason`` says why."""

    def __new__(cls, reason: str):
        self = super().__new__(cls, None, None, None)
        self.reason = reason
        return self


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--ml-warm``: hand the whole session to a warm server's child; ``--ml-warm-stop``: stop it."""
    return warm.cmdline_main(config, OFFLINE_ENVIRONMENT)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run this test on real models (opts out of the automatic fake models and the unit-tree guard)",
    )
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    # Pinned for child processes too (pytester moves HOME), so models are built once per machine.
    if config.getoption("ml_model_cache_dir"):
        os.environ["ML_MODEL_CACHE_DIR"] = config.getoption("ml_model_cache_dir")
    os.environ.setdefault("ML_MODEL_CACHE_DIR", str(app_config.model_cache_dir()))
    settings = Settings.from_config(config)
    report = LoadReport(worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))
    config.stash[settings_key] = settings
    config.stash[load_report_key] = report
    config.stash[pool_key] = ModelPool(settings.memory_budget, on_load=report.timed_load, on_evict=report.evicted)
    config.stash[cassettes_key] = Cassettes(settings.cassette_dir, settings.record)
    config.stash[blocker_key] = ModelBlocker()
    config.stash[current_item_key] = None
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistReport(report), "ml-models-xdist")
    config.stash[build_lines_key] = _TerminalLines(config)
    logging.getLogger("app.ml.embedded").addHandler(config.stash[build_lines_key])
    logging.getLogger("app.ml.embedded").setLevel(logging.INFO)


def pytest_unconfigure(config: pytest.Config) -> None:
    if build_lines_key in config.stash:
        logging.getLogger("app.ml.embedded").removeHandler(config.stash[build_lines_key])


class _TerminalLines(logging.Handler):
    """Shows log lines (the embedded models' builds) in pytest's terminal, even with capture on."""

    def __init__(self, config: pytest.Config):
        super().__init__(logging.INFO)
        self.config = config

    def emit(self, record: logging.LogRecord) -> None:
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if terminal is None:  # an xdist worker: no terminal of its own
            return
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            terminal.ensure_newline()
            terminal.write_line(self.format(record))


def cached_fixture_scope(fixture_name: str, config: pytest.Config) -> str:
    """Module scope, or function scope under ``--ml-model-scope=function`` (a load per test)."""
    return "function" if config.stash[settings_key].scope is ModelScope.FUNCTION else "module"


def model_key(config: pytest.Config, kind: ModelKind, path: object = None) -> ModelKey:
    settings = config.stash[settings_key]
    model = kind.model_name if path is None else f"{kind.model_name} @ {path}"
    return ModelKey(model, settings.device or "auto", settings.dtype or "default")


def pool_model(config: pytest.Config, kind: ModelKind, path: object = None) -> LoadedModel:
    """``kind``'s real model from the pool (loaded there on first use)."""
    settings = config.stash[settings_key]
    return config.stash[pool_key].acquire(
        model_key(config, kind, path), lambda: kind.load_real(path, settings.device, settings.dtype)
    )


def _marked(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARKER) is not None


def _refuse_unmarked(config: pytest.Config, item: pytest.Item, policy: Policy, what: str) -> None:
    """Under the unit policy, a real model for a test that is not marked fails it, naming the way out."""
    if policy is Policy.UNIT and not _marked(item) and not config.stash[blocker_key].unblocked:
        pytest.fail(BlockedTest.of(item, policy).message(what), pytrace=False)


def cached_model(request: pytest.FixtureRequest, kind: ModelKind, policy: str) -> LoadedModel:
    """What a cached fixture yields: the pooled model, or an :class:`UnavailableModel`.

    The guard has checked the test that sets it up (``pytest_fixture_setup``); every later test
    of the module is checked again by ``route_model_loads``.
    """
    config = request.config
    config.stash[load_report_key].current_policy = Policy.parse(policy, "ml_model_policy")
    try:
        return pool_model(config, kind)
    except ModelUnavailableError as exc:
        return UnavailableModel(f"{kind.fixture}: {exc}")


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> None:
    """Refuse a cached fixture to a test that the guard blocks, before anything loads.

    Refused here, before pytest's own set-up, the refusal is not cached with the module-scoped
    fixture: a later marked test of the module still gets the model.
    """
    kind = next((k for k in KINDS if k.fixture == fixturedef.argname), None)
    item = request.config.stash[current_item_key]
    if kind is not None and item is not None:
        policy = Policy.parse(request.getfixturevalue("ml_model_policy"), "ml_model_policy")
        _refuse_unmarked(request.config, item, policy, kind.fixture)


def private_copy(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, kind: ModelKind, policy: str
) -> LoadedModel:
    """A fresh load of ``kind``'s model for one test, outside the pool; the services of the test use it."""
    config = request.config
    policy = Policy.parse(policy, "ml_model_policy")
    config.stash[load_report_key].current_policy = policy
    _refuse_unmarked(config, request.node, policy, kind.copy_fixture)
    settings = config.stash[settings_key]
    key = dataclasses.replace(model_key(config, kind), model=f"{kind.model_name} (private copy)")
    try:
        loaded = config.stash[load_report_key].timed_load(key, lambda: kind.load_real(None, settings.device, settings.dtype))
    except ModelUnavailableError as exc:
        pytest.skip(f"{kind.copy_fixture}: {exc}")
    monkeypatch.setattr(kind.service, "_load_model", lambda self: loaded)
    return loaded


def route_model_loads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    """Point each service's loading seam at fakes, or at the pool for tests on real models."""
    policy = Policy.parse(policy, "ml_model_policy")
    item, config = request.node, request.config
    config.stash[load_report_key].current_policy = policy
    used = [kind for kind in KINDS if kind.fixture in request.fixturenames]
    for kind in used:
        _refuse_unmarked(config, item, policy, kind.fixture)
        loaded = request.getfixturevalue(kind.fixture)
        if isinstance(loaded, UnavailableModel):
            pytest.skip(loaded.reason)
    cassettes, settings = config.stash[cassettes_key], config.stash[settings_key]
    cassette = cassettes.path_for(item.path, config.rootpath)
    if _marked(item) or used:
        for kind in KINDS:
            monkeypatch.setattr(kind.service, "_load_model", lambda self, k=kind: pool_model(config, k, k.service_path(self)))
            record = cassettes.recording(cassette, kind.source)
            if record is not None:
                _record_model_calls(monkeypatch, kind, record)
        return
    for kind in KINDS:
        replay = Replay(cassettes.replay_index(kind.source), settings.replay, kind.model_name, item.nodeid, cassette)
        monkeypatch.setattr(kind.service, "_load_model", lambda self, k=kind, r=replay: k.make_fake(r))
    if policy is Policy.UNIT:
        config.stash[blocker_key].guard_test(request, monkeypatch, BlockedTest.of(item, policy))
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
    report = item.config.stash[load_report_key]
    report.current_test = item.nodeid
    item.config.stash[current_item_key] = item
    try:
        return (yield)
    finally:
        report.current_test = report.current_policy = None
        item.config.stash[current_item_key] = None


def modification_message(key: ModelKey, changes: list[str]) -> str:
    kind = next(k for k in KINDS if key.model.split(" @ ")[0] == k.model_name)
    return "\n".join(
        [
            f"modified the shared model {key}:",
            *(f"  - {change}" for change in changes),
            "Every test of this run shares that loaded model (the pool), so the change would reach the tests after this one.",
            f"Change a private copy instead: request {kind.copy_fixture} ({COPY_COST}), "
            "or undo the change before the test ends (e.g. model.eval() after model.train()).",
            "The pool has reloaded the model in place: the next test gets a clean one.",
        ]
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """After a test's call and teardown: fail it if it changed a pooled model, and restore the model."""
    report = yield
    if call.when in ("call", "teardown"):
        pool = item.config.stash[pool_key]
        for key, changes in pool.modified():
            message = modification_message(key, changes)
            pool.refresh(key)
            if report.failed:
                report.sections.append(("modified the shared model", message))
            else:
                report.outcome, report.longrepr = "failed", message
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        scope = item.config.stash[settings_key].scope
        module_ends = nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None)
        if scope is ModelScope.FUNCTION or (scope is ModelScope.MODULE and module_ends):
            item.config.stash[pool_key].clear()


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    report = config.stash[load_report_key]
    config.stash[pool_key].clear()
    cassettes = config.stash[cassettes_key]
    report.cassettes_written = [str(p) for p in cassettes.save()]
    report.stale_cassettes = cassettes.stale([kind.source for kind in KINDS])
    report.finish()
    if hasattr(config, "workeroutput"):
        config.workeroutput["ml_model_report"] = report.to_dict()
    elif config.stash[settings_key].report_path:
        report.write_json(config.stash[settings_key].report_path)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    terminalreporter.section("ML model loads")
    for line in config.stash[load_report_key].summary_lines():
        terminalreporter.write_line(line)


class _XdistReport:
    """Collects the workers' load reports on the controller."""

    def __init__(self, report: LoadReport):
        self.report = report

    def pytest_testnodedown(self, node, error) -> None:
        data = getattr(node, "workeroutput", {}).get("ml_model_report")
        if data:
            self.report.merge(data)
