"""The pytest plugin of the ML fixture library.

The module-level hooks add the options and the ``pytest_ml_project`` hook, hand ``--ml-warm`` runs
to the warm server, and register one :class:`MLModels` object per run (in the manner of
pytest-xdist's ``DSession``): the run's state — settings, pool, load report, cassettes, the guard's
blocker, the test being run — and the hooks that act on it. The fixtures (``fixtures.py``) reach
it through :func:`ml_models`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol  # the protocol's phases without logging, as pytest-rerunfailures uses it
from pytest_socket import disable_socket, enable_socket

from ml_fixtures import hookspecs, warm
from ml_fixtures.cassettes import Cassettes, Replay
from ml_fixtures.declaration import DeclarationError, LoadedModel, ModelSpec, Project
from ml_fixtures.guard import MARKER, BlockedTest, ModelBlocker, loaders_of
from ml_fixtures.load_report import LoadReport
from ml_fixtures.options import ModelScope, Policy, Settings
from ml_fixtures.options import pytest_addoption as pytest_addoption  # noqa: F401 (a hook)
from ml_fixtures.parallel import ParallelRuns, worker_id
from ml_fixtures.parallel import pytest_xdist_auto_num_workers as pytest_xdist_auto_num_workers  # noqa: F401 (a hook)
from ml_fixtures.pool import ModelKey, ModelPool

ml_models_key = pytest.StashKey["MLModels"]()
#: Model hubs are never reached from tests: the resolvers use local files only. Set for every run
#: unless the caller set them; a warm server imports the hubs' libraries with them too.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def project_of(config: pytest.Config) -> Project:
    """The project's declaration (``pytest_ml_project``), or an empty one: no models."""
    project = config.hook.pytest_ml_project(config=config)
    if project is None:
        return Project(models=(), tests_dir=config.rootpath, cache_dir=lambda: Path.home() / ".cache" / "ml-fixtures")
    if not isinstance(project, Project):
        raise pytest.UsageError(f"pytest_ml_project must return an ml_fixtures.declaration.Project, not {project!r}")
    return project


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--ml-warm``: hand the whole session to a warm server's child; ``--ml-warm-stop``: stop it."""
    defaults = dict(OFFLINE_ENVIRONMENT)
    if config.getoption("ml_warm") and not warm.is_child(config):
        preload = project_of(config).preload
        if not preload:  # no conftest declares a project here (a path that does not exist, say)
            warm.say("no project declares its models here (pytest_ml_project); running cold")
            return None
        defaults["ML_WARM_PRELOAD"] = ",".join(preload)  # the server imports what the project's models use
    return warm.cmdline_main(config, defaults)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run this test on real models (opts out of the automatic fake models and the unit-tree guard)",
    )
    config.addinivalue_line(
        "markers", "fresh_db: test_db on a database of this test's own, where commits are real (see test_db)"
    )
    plugin = MLModels(config, project_of(config))
    config.stash[ml_models_key] = plugin
    config.pluginmanager.register(plugin, "ml-models")
    config.pluginmanager.register(ParallelRuns(config), "ml-models-parallel")


def ml_models(config: pytest.Config) -> MLModels:
    """The run's :class:`MLModels`."""
    return config.stash[ml_models_key]


class UnavailableModel(LoadedModel):
    """``(None, None, None)`` from a cached fixture whose model could not be had; ``.reason`` says why."""

    def __new__(cls, reason: str):
        self = super().__new__(cls, None, None, None)
        self.reason = reason
        return self


class _TerminalLines(logging.Handler):
    """Shows log lines (the project's model builds) in pytest's terminal, even with capture on."""

    def __init__(self, config: pytest.Config):
        super().__init__(logging.INFO)
        self.config = config

    def emit(self, record: logging.LogRecord) -> None:
        terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        worker = worker_id(self.config)
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if worker is not None:  # an xdist worker's terminal is its channel to the controller; its stderr is the controller's
                print(f"[{worker}] {self.format(record)}", file=sys.stderr, flush=True)
            elif terminal is not None:
                terminal.ensure_newline()
                terminal.write_line(self.format(record))


class MLModels:
    """One run's state, and the hooks that act on it (registered as the plugin ``ml-models``)."""

    def __init__(self, config: pytest.Config, project: Project):
        self.config, self.project = config, project
        self.settings = Settings.from_config(config, project.cassettes)
        self.report = LoadReport(worker=worker_id(config) or "main")
        self.pool = ModelPool(
            self.settings.memory_budget,
            on_load=self.report.timed_load,
            on_evict=self.report.evicted,
            unavailable=project.unavailable,
        )
        # Releasing the pool also undoes the tokenizer-class patch of its snapshots (mutation.py).
        config.add_cleanup(self.pool.clear)
        self.cassettes = Cassettes(self.settings.cassette_dir, self.settings.record)
        self.blocker = ModelBlocker(loaders_of(project))
        self.by_cached_fixture = {spec.cached_fixture: spec for spec in project.models}
        #: The test being run: module-scoped fixtures are set up on behalf of whichever test comes first.
        self.item: pytest.Item | None = None
        self._policies: dict[object, Policy] = {}
        self._pin_environment()
        self._show_builds()

    # ------------------------------------------------------------ process-wide changes, undone at the end

    def _pin_environment(self) -> None:
        environment = pytest.MonkeyPatch()
        self.config.add_cleanup(environment.undo)  # in-process runs (pytester) leave nothing behind
        for variable, value in OFFLINE_ENVIRONMENT.items():
            environment.setenv(variable, os.environ.get(variable, value))
        variable = self.project.cache_dir_variable
        if variable:  # pinned for child processes too (pytester moves HOME): models are built once per machine
            chosen = self.config.getoption("ml_model_cache_dir") or os.environ.get(variable) or self.project.cache_dir()
            environment.setenv(variable, str(chosen))

    def _show_builds(self) -> None:
        handler = _TerminalLines(self.config)
        for name in self.project.build_loggers:
            logger = logging.getLogger(name)
            level = logger.level
            logger.setLevel(logging.INFO if level == logging.NOTSET else min(level, logging.INFO))
            logger.addHandler(handler)
            self.config.add_cleanup(functools.partial(logger.setLevel, level))
            self.config.add_cleanup(functools.partial(logger.removeHandler, handler))

    # ------------------------------------------------------------ policy and the guard

    def policy_of(self, request: pytest.FixtureRequest) -> Policy:
        """The requesting test's directory rule (its ``ml_model_policy``), parsed once per value."""
        value = request.getfixturevalue("ml_model_policy")
        if value not in self._policies:
            self._policies[value] = Policy.parse(value, "ml_model_policy")
        policy = self._policies[value]
        self.report.current_policy = policy
        return policy

    def refuse_unmarked(self, item: pytest.Item, policy: Policy, what: str) -> None:
        """Under the unit policy, a real model for a test that is not marked fails it, naming the way out."""
        if policy is Policy.UNIT and item.get_closest_marker(MARKER) is None and not self.blocker.unblocked:
            pytest.fail(BlockedTest.of(item, policy).message(what), pytrace=False)

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest) -> None:
        """Refuse a cached fixture to a test that the guard blocks, before anything loads.

        Refused here, before pytest's own set-up, the refusal is not cached with the module-scoped
        fixture: a later marked test of the module still gets the model.
        """
        if fixturedef.argname in self.by_cached_fixture and self.item is not None:
            self.refuse_unmarked(self.item, self.policy_of(request), fixturedef.argname)

    # ------------------------------------------------------------ what the fixtures get

    def key(self, spec: ModelSpec, path: Path | None = None, private: bool = False) -> ModelKey:
        settings = self.settings
        return ModelKey(
            spec.model_name,
            settings.device or "auto",
            settings.dtype or "default",
            None if path is None else str(path),
            private,
        )

    def pooled(self, spec: ModelSpec, path: Path | None = None) -> LoadedModel:
        """``spec``'s real model from the pool (loaded there on first use)."""
        settings = self.settings
        return self.pool.acquire(self.key(spec, path), lambda: spec.load_real(path, settings.device, settings.dtype))

    def cached(self, request: pytest.FixtureRequest, spec: ModelSpec) -> LoadedModel:
        """What a cached fixture yields: the pooled model, or an :class:`UnavailableModel`.

        The guard has checked the test that sets it up (``pytest_fixture_setup``); every later test
        of the module is checked again by :meth:`route`.
        """
        self.policy_of(request)
        try:
            return self.pooled(spec)
        except self.project.unavailable as exc:
            return UnavailableModel(f"{spec.cached_fixture}: {exc}")

    def private_copy(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> LoadedModel:
        """A fresh load of ``spec``'s model for one test, outside the pool; the test's services use it."""
        self.refuse_unmarked(request.node, self.policy_of(request), spec.copy_fixture)
        settings = self.settings
        try:
            loaded = self.report.timed_load(
                self.key(spec, private=True), lambda: spec.load_real(None, settings.device, settings.dtype)
            )
        except self.project.unavailable as exc:
            pytest.skip(f"{spec.copy_fixture}: {exc}")
        monkeypatch.setattr(spec.service, spec.seam, lambda service: loaded)
        return loaded

    def route(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point each service's loading seam at fakes, or at the pool for tests on real models."""
        item, policy = request.node, self.policy_of(request)
        used = [spec for spec in self.project.models if spec.cached_fixture in request.fixturenames]
        for spec in used:
            self.refuse_unmarked(item, policy, spec.cached_fixture)
            loaded = request.getfixturevalue(spec.cached_fixture)
            if isinstance(loaded, UnavailableModel):
                pytest.skip(loaded.reason)
        cassette = self.cassettes.path_for(item.path, self.config.rootpath)
        if item.get_closest_marker(MARKER) is not None or used:
            for spec in self.project.models:
                monkeypatch.setattr(spec.service, spec.seam, lambda service, s=spec: self.pooled(s, s.path_of(service)))
                record = self.cassettes.recording(cassette, spec)
                if record is not None:
                    _record_model_calls(monkeypatch, spec, record)
            return
        for spec in self.project.models:
            replay = Replay(
                self.cassettes.replay_index(spec), self.settings.replay, spec.model_name, item.nodeid, cassette
            )
            monkeypatch.setattr(spec.service, spec.seam, lambda service, s=spec, r=replay: s.make_fake(r))
        if policy is Policy.UNIT:
            self.blocker.guard_test(request, monkeypatch, BlockedTest.of(item, policy))
            # What pytest-socket's socket_disabled fixture does, without a fixture's set-up per test.
            disable_socket(allow_unix_socket=self.config.getoption("--allow-unix-socket"))
            request.addfinalizer(enable_socket)

    # ------------------------------------------------------------ collection

    @pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Group tests by the cached model they use, so that ``--dist loadgroup`` loads it once."""
        for item in items:
            for spec in self.project.models:
                if spec.cached_fixture in getattr(item, "fixturenames", ()) and not item.get_closest_marker("xdist_group"):
                    item.add_marker(pytest.mark.xdist_group(spec.name))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Every declared model's fixtures exist: a missing one is named with the line that defines it."""
        defined = session._fixturemanager._arg2fixturedefs
        factories = {"cached": "cached_model_fixture", "copy": "model_copy_fixture", "mock": "mock_service_fixture"}
        missing = [
            f"{name} = {factory}(<the ModelSpec named {spec.name!r}>)"
            for spec in self.project.models
            for name, factory in zip(spec.fixtures, factories.values())
            if name not in defined
        ]
        if missing:
            raise pytest.UsageError(
                "declared models without their fixtures; add to the root conftest (with "
                "`from ml_fixtures.fixtures import cached_model_fixture, model_copy_fixture, mock_service_fixture`):\n"
                + "\n".join(f"    {line}" for line in missing)
            )

    # ------------------------------------------------------------ each test

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        """pytest's own protocol, with the reports logged after the teardown (as pytest-rerunfailures does).

        The pooled models are checked after the test's teardown, so that a change that a fixture
        undoes (``monkeypatch``) is no change; a test that changed one then fails in its call report,
        as if the check had run inside it.
        """
        self.report.current_test, self.item = item.nodeid, item
        try:
            item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            self._fail_modifying_test(reports)
            for report in reports:
                item.ihook.pytest_runtest_logreport(report=report)
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        finally:
            self.report.current_test = self.report.current_policy = self.item = None
        return True

    def _fail_modifying_test(self, reports: list[pytest.TestReport]) -> None:
        """Fail the test for each pooled model the check after its teardown found changed."""
        report = next((r for r in reports if r.when == "call"), reports[-1])
        for key, changes in self.pool.modified():
            message = self.modification_message(key, changes)
            if report.failed:
                report.sections.append(("modified the shared model", message))
                continue
            report.outcome, report.longrepr = "failed", message
            if hasattr(report, "wasxfail"):  # an expected failure does not excuse the change
                del report.wasxfail

    def modification_message(self, key: ModelKey, changes: list[str]) -> str:
        spec = self.project.spec_for(key.model)
        loads = [record.seconds for record in self.report.records if record.model == str(key)]
        cost = f"this model's last load here took {loads[-1]:.2f} s" if loads else "a fresh load from disk"
        return "\n".join(
            [
                f"modified the shared model {key}:",
                *(f"  - {change}" for change in changes),
                "Every test of this run shares that loaded model (the pool), so the change would reach the tests after this one.",
                f"Change a private copy instead: request {spec.copy_fixture} ({cost}), "
                "or undo the change before the test ends (e.g. model.eval() after model.train()).",
                "The pool has restored it in place after this test: the next test gets it as loaded.",
            ]
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):
        """After the fixtures' teardown: check the pooled models, restore the changed ones in place
        (a :class:`~ml_fixtures.pool.ModelRestoreError` naming the model if one cannot be loaded
        again), and release them as the scope policy says."""
        try:
            return (yield)
        finally:
            scope = self.settings.scope
            module_ends = nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None)
            release = scope is ModelScope.FUNCTION or (scope is ModelScope.MODULE and module_ends)
            self.pool.after_test(item.nodeid, deferred=module_ends, release=release)

    # ------------------------------------------------------------ the end

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report = self.report
        self.pool.clear()
        report.cassettes_written = [str(p) for p in self.cassettes.save()]
        report.stale_cassettes = self.cassettes.stale(self.project.models)
        report.finish()
        if hasattr(self.config, "workeroutput"):
            self.config.workeroutput["ml_model_report"] = report.to_dict()
        elif self.settings.report_path:
            report.write_json(self.settings.report_path)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("ML model loads")
        for line in self.report.summary_lines():
            terminalreporter.write_line(line)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """On the xdist controller: merge each worker's load report."""
        data = getattr(node, "workeroutput", {}).get("ml_model_report")
        if data:
            self.report.merge(data)


def _record_model_calls(monkeypatch: pytest.MonkeyPatch, spec: ModelSpec, record) -> None:
    """Wrap the service's model call so that each input and its raw output land in the cassette."""
    call = getattr(spec.service, spec.call.method)

    @functools.wraps(call)
    def recording(service, *args, **kwargs):
        output = call(service, *args, **kwargs)
        if spec.path_of(service) is None:  # only the default model has a cassette entry
            inputs, outputs = list(spec.call.inputs(*args, **kwargs)), list(spec.call.outputs(service, output))
            if len(inputs) != len(outputs):
                raise DeclarationError(
                    f"ModelSpec {spec.name!r}: for one call of {spec.service.__name__}.{spec.call.method}, "
                    f"ModelCall.inputs gave {len(inputs)} inputs and ModelCall.outputs {len(outputs)} outputs; "
                    "they must pair up one to one"
                )
            for call_input, call_output in zip(inputs, outputs):
                record(call_input, call_output)
        return output

    monkeypatch.setattr(spec.service, spec.call.method, recording)
