"""The pytest plugin of the ML fixture library.

The module-level hooks add the options and the ``pytest_ml_project`` hook, hand ``--ml-warm`` runs
to the warm server, and register one :class:`MLModels` object per run (in the manner of
pytest-xdist's ``DSession``): the run's state — settings, pool, load report, modification check,
cassettes and which entries each test used, what the run selected, the guard's blocker, the test
being run — and the hooks that act on it. The fixtures (``fixtures.py``) reach it through
:func:`ml_models`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
from pathlib import Path

import pytest
from pytest_socket import disable_socket, enable_socket

from _ml_fixtures_warm_core.identity import EnvironmentDefaults
from ml_fixtures import hookspecs, verify
from ml_fixtures.affected.plugin import AffectedRun, answer_digest
from ml_fixtures.cassettes import Cassettes, Replay, environment
from ml_fixtures.database import network_allowed
from ml_fixtures.declaration import LoadedModel, ModelSpec, Project
from ml_fixtures.guard import MARKER, BlockedTest, ModelBlocker, loaders_of
from ml_fixtures.hookspecs import project_of
from ml_fixtures.load_report import LoadReport
from ml_fixtures.modification import ModificationCheck
from ml_fixtures.options import Policy, RecordMode, Settings, take_back_a_path
from ml_fixtures.options import pytest_addoption as pytest_addoption  # noqa: F401 (a hook)
from ml_fixtures.parallel import THREADS_INPUT, ParallelRuns, worker_id
from ml_fixtures.parallel import pytest_xdist_auto_num_workers as pytest_xdist_auto_num_workers  # noqa: F401 (a hook)
from ml_fixtures.pool import ModelKey, ModelPool
from ml_fixtures.seams import SeamRoutes
from ml_fixtures.unused import unused_lines
from ml_fixtures.usage import CassetteUsage, EntryRef, Selection, Use, prune_refusal, write_usage
from ml_fixtures.warm import client as warm
from ml_fixtures.warm.threads import SharedThreads

ml_models_key = pytest.StashKey["MLModels"]()
#: Model hubs are never reached from tests: the resolvers use local files only. Set for every run
#: unless the caller set them; a warm server imports the hubs' libraries with them too.
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--ml-warm``: hand the whole session to a warm server's child; ``--ml-warm-stop``: stop it."""
    variables = dict(OFFLINE_ENVIRONMENT)
    watching = config.getoption("ml_watch") and not warm.is_child(config) and not hasattr(config, "workerinput")
    if (config.getoption("ml_warm") or watching) and not warm.is_child(config):
        preload = project_of(config).preload
        if not preload:  # no conftest declares a project here (a path that does not exist, say)
            warm.say("no project declares its models here (pytest_ml_project); running cold")
            return None
        variables["ML_WARM_PRELOAD"] = ",".join(preload)  # the server imports what the project's models use
    if watching:
        from ml_fixtures.warm import watch  # its watcher (watchfiles) only here

        return watch.main(config, EnvironmentDefaults.of(variables))
    return warm.cmdline_main(config, EnvironmentDefaults.of(variables))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run this test on real models (opts out of the automatic fake models and the unit-tree guard)",
    )
    take_back_a_path(config)
    config.addinivalue_line(
        "markers", "fresh_db: test_db on a database of this test's own, where commits are real (see test_db)"
    )
    plugin = MLModels(config, project_of(config))
    config.stash[ml_models_key] = plugin
    config.pluginmanager.register(plugin, "ml-models")
    if plugin.threads is not None:
        config.pluginmanager.register(plugin.threads, "ml-warm-threads")
    config.pluginmanager.register(plugin.affected, "ml-affected")
    config.pluginmanager.register(ParallelRuns(config, warm_threads=plugin.threads is not None), "ml-models-parallel")


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
        self.modification = ModificationCheck(self.settings.scope, self.modification_message)
        self.pool = ModelPool(
            self.settings.memory_budget,
            on_load=self._timed_load,
            on_evict=lambda key: self.report.evicted(key, self.current_test),
            unavailable_errors=project.unavailable_errors,
            on_changed=self.modification.found,
        )
        # Releasing the pool also undoes the tokenizer-class patch of its snapshots (mutation.py).
        config.add_cleanup(self.pool.clear)
        #: The dependency record, and --ml-affected.
        self.affected = AffectedRun(config, self, self.settings.affected, self.settings.fingerprint(config))
        self.cassettes = Cassettes(self.settings.cassette_dir, self.settings.record, self.affected.fingerprints)
        #: In a warm child: its share of the CPUs, taken between tests (None in a cold run).
        ceiling = getattr(config, "workerinput", {}).get(THREADS_INPUT)
        self.threads = SharedThreads(self.uses_real_models, ceiling) if SharedThreads.applies() else None
        #: Per test, the cassette entries it replayed or recorded (merged from the xdist workers on the controller).
        self.usage = CassetteUsage()
        #: What the run selected and how its tests ended: whether it speaks for the whole suite.
        self.selection = Selection.of_run(config)
        self._deselected: set[str] = set()
        #: The end of the run's cassette work: verify's report, the entries no test used, prune's outcome.
        self.drift: verify.DriftReport | None = None
        self.unused: list[EntryRef] | None = None
        self.pruned: list[str] = []
        self.prune_refused = ""
        self.blocker = ModelBlocker(loaders_of(project))
        config.add_cleanup(self.blocker.release)
        self.seams = SeamRoutes(project.models)
        config.add_cleanup(self.seams.release)
        self.by_cached_fixture = {spec.cached_fixture: spec for spec in project.models}
        #: The test being run: module-scoped fixtures are set up on behalf of whichever test comes first.
        self.item: pytest.Item | None = None
        #: Its directory's rule, once a fixture of the library has read it (the load report names it).
        self.policy: Policy | None = None
        #: What loads real models after the last test (the load report names it), e.g. "--ml-record=verify".
        self.end_of_run: str | None = None
        self._policies: dict[object, Policy] = {}
        self._policy_of_parent: dict[pytest.Item | pytest.Collector, Policy] = {}
        #: pytest-socket's blocked socket functions, made once (its disable_socket makes a class each call).
        self._blocked_network: tuple | None = None
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

    @property
    def current_test(self) -> str | None:
        return self.end_of_run if self.item is None else self.item.nodeid

    def _timed_load(self, key: ModelKey, load) -> LoadedModel:
        """Every real load, timed into the report under the test that caused it and its directory's rule."""
        return self.report.timed_load(key, load, self.current_test, self.policy)

    def policy_of(self, request: pytest.FixtureRequest) -> Policy:
        """The requesting test's directory rule (its ``ml_model_policy``), parsed once per value.

        A test's fixture overrides come from its module, its classes and the conftests above them,
        so the tests of one module or class share the rule (unless a test parametrizes it itself).
        """
        node = request.node
        test = node if isinstance(node, pytest.Function) else self.item
        parametrized = getattr(getattr(test, "callspec", None), "params", {})
        if "ml_model_policy" in parametrized:  # the test's own value: a module-scoped request cannot ask for it
            return self._parsed_policy(parametrized["ml_model_policy"])
        shared = isinstance(node, pytest.Function)
        if shared and node.parent in self._policy_of_parent:
            return self._policy_of_parent[node.parent]
        policy = self._parsed_policy(request.getfixturevalue("ml_model_policy"))
        if shared:
            self._policy_of_parent[node.parent] = policy
        return policy

    def _parsed_policy(self, value: object) -> Policy:
        if value not in self._policies:
            self._policies[value] = Policy.parse(value, "ml_model_policy")
        return self._policies[value]

    def enter_policy(self, request: pytest.FixtureRequest) -> Policy:
        """The requesting test's rule, kept as the current test's for the load report."""
        self.policy = self.policy_of(request)
        return self.policy

    def refuse_unmarked(self, item: pytest.Item, policy: Policy, what: str) -> None:
        """Under the unit policy, a real model for a test that is not marked fails it, naming the way out."""
        if policy is Policy.UNIT and item.get_closest_marker(MARKER) is None and not self.blocker.unblocked:
            pytest.fail(BlockedTest.of(item, policy).message(what), pytrace=False)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
        """Refuse a cached fixture to a test that the guard blocks, before anything loads; and guard the
        set-up of a module- or session-scoped fixture for such a test as its body is guarded.

        Refused here, before pytest's own set-up, the refusal is not cached with the module-scoped
        fixture: a later marked test of the module still gets the model. A shared fixture is set up
        before the test's own fixtures (the autouse one that blocks the test among them), so without
        this a real load in it would pass unguarded and unreported.
        """
        item = self.item
        if item is None or fixturedef.argname == "ml_model_policy":
            return (yield)
        if fixturedef.argname in self.by_cached_fixture:
            self.refuse_unmarked(item, self.policy_of(request), fixturedef.argname)
            return (yield)
        if fixturedef.scope == "function" or self.blocker.unblocked or item.get_closest_marker(MARKER) is not None:
            return (yield)
        policy = self.policy_of(request)
        if policy is not Policy.UNIT:
            return (yield)
        with self.blocker.block(BlockedTest.of(item, policy)):
            return (yield)

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
        self.affected.used_model(spec.model_name)
        settings = self.settings
        return self.pool.acquire(self.key(spec, path), lambda: spec.load_real(path, settings.device, settings.dtype))

    def cached(self, request: pytest.FixtureRequest, spec: ModelSpec) -> LoadedModel:
        """What a cached fixture yields: the pooled model, or an :class:`UnavailableModel`.

        The guard has checked the test that sets it up (``pytest_fixture_setup``); every later test
        of the module is checked again by :meth:`route`.
        """
        self.enter_policy(request)
        try:
            return self.pooled(spec)
        except self.project.unavailable_errors as exc:
            return UnavailableModel(f"{spec.cached_fixture}: {exc}")

    def private_copy(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> LoadedModel:
        """A fresh load of ``spec``'s model for one test, outside the pool; the test's services use it."""
        self.refuse_unmarked(request.node, self.enter_policy(request), spec.copy_fixture)
        self.affected.used_model(spec.model_name)
        settings = self.settings
        try:
            loaded = self._timed_load(self.key(spec, private=True), lambda: spec.load_real(None, settings.device, settings.dtype))
        except self.project.unavailable_errors as exc:
            pytest.skip(f"{spec.copy_fixture}: {exc}")
        monkeypatch.setattr(spec.service, spec.seam, lambda service: loaded)
        return loaded

    def fingerprint(self, model_name: str) -> str | None:
        """The fingerprint of a declared model's default model now (None: not on disk, or no longer declared)."""
        try:
            return self.cassettes.current_fingerprint(self.project.spec_for(model_name))
        except KeyError:
            return None

    def answer(self, model_name: str, key: str) -> str:
        """The digest of what the fakes would answer now for ``key`` ("" for nothing recorded; "?"
        while the model is not on disk: which cassettes are stale is only known once it is built)."""
        try:
            spec = self.project.spec_for(model_name)
        except KeyError:
            return ""
        if self.cassettes.current_fingerprint(spec) is None:
            return "?"
        return answer_digest(self.cassettes.replay_index(spec).get(key))

    def uses_real_models(self, item: pytest.Item) -> bool:
        """Whether ``item`` runs on real models: it is marked, or uses a cached or copy fixture."""
        names = getattr(item, "fixturenames", ())
        return item.get_closest_marker(MARKER) is not None or any(
            spec.cached_fixture in names or spec.copy_fixture in names for spec in self.project.models
        )

    def route(self, request: pytest.FixtureRequest) -> None:
        """Point each service's loading seam at fakes, or at the pool for tests on real models."""
        item, policy = request.node, self.enter_policy(request)
        used = [spec for spec in self.project.models if spec.cached_fixture in request.fixturenames]
        for spec in used:
            self.refuse_unmarked(item, policy, spec.cached_fixture)
            self.affected.used_model(spec.model_name)
            loaded = request.getfixturevalue(spec.cached_fixture)
            if isinstance(loaded, UnavailableModel):
                pytest.skip(loaded.reason)
        cassette = self.cassettes.path_for(item.path, self.config.rootpath)
        if item.get_closest_marker(MARKER) is not None or used:
            monkeypatch = request.getfixturevalue("monkeypatch")
            for spec in self.project.models:
                self._watch_model_calls(monkeypatch, item.nodeid, cassette, spec)
            self.seams.route(request, self._pooled_for)
            return
        self.seams.route(request, functools.partial(self._fake_for, item.nodeid, cassette))
        if policy is Policy.UNIT:
            self.blocker.guard_test(request, BlockedTest.of(item, policy))
            self._block_network(request)

    def _block_network(self, request: pytest.FixtureRequest) -> None:
        """What pytest-socket's socket_disabled fixture does, without a fixture's set-up per test."""
        if self._blocked_network is None:
            with network_allowed():  # puts back what was there
                disable_socket(allow_unix_socket=self.config.getoption("--allow-unix-socket"))
                self._blocked_network = socket.socket, socket.getaddrinfo, socket.gethostbyname
        socket.socket, socket.getaddrinfo, socket.gethostbyname = self._blocked_network
        request.addfinalizer(enable_socket)

    def _pooled_for(self, spec: ModelSpec, service) -> LoadedModel:
        """The seam of a test on real models: the pooled model the service asks for."""
        return self.pooled(spec, spec.path_of(service))

    def _fake_for(self, test: str, cassette: Path, spec: ModelSpec, service) -> LoadedModel:
        """The seam of a test on fakes: a fake answering from the cassettes for ``test``, whose module's is ``cassette``."""
        replay = Replay(
            self.cassettes.replay_index(spec), self.settings.replay, spec.model_name, test, cassette,
            on_lookup=lambda key, answer, model=spec.model_name: self.affected.looked_up(model, key, answer),
            on_replay=functools.partial(self._replayed, test, spec),
        )  # fmt: skip
        return spec.make_fake(replay)

    # ------------------------------------------------------------ cassettes: what each test uses

    def environment(self, device: str | None) -> dict[str, str]:
        """What the real models' outputs come from now: the project's packages, the device, the dtype."""
        return environment(self.project.environment_packages, device, self.settings.dtype)

    def _user(self, test: str) -> str:
        """Whose use it is: the test being run (a fake cached by a module-scoped fixture answers for each), else ``test``."""
        return test if self.item is None else self.item.nodeid

    def _replayed(self, test: str, spec: ModelSpec, key: str) -> None:
        self.usage.note(self._user(test), self.cassettes.replayed(spec, key), Use.REPLAYED)

    def _watch_model_calls(self, monkeypatch: pytest.MonkeyPatch, test: str, cassette: Path, spec: ModelSpec) -> None:
        """Wrap the service's model call, for a test on the real model: each call of the default model whose entry
        the module's cassette holds, or gets now (``--ml-record=once|rewrite``), is noted as the test's."""
        record = self.cassettes.recording(cassette, spec, lambda: self.environment(self.pooled(spec).device))
        held = self.cassettes.held(cassette, spec)
        if record is None and not held:
            return
        name, call = self.cassettes.relative(cassette), getattr(spec.service, spec.call.method)

        @functools.wraps(call)
        def watched(service, *args, **kwargs):
            output = call(service, *args, **kwargs)
            if spec.path_of(service) is None:  # only the default model has cassette entries
                for key, value in spec.call_entries(service, args, kwargs, output):
                    if (record is not None and record(key, value)) or key in held:
                        self.usage.note(self._user(test), EntryRef(name, spec.model_name, key), Use.RECORDED)
            return output

        monkeypatch.setattr(spec.service, spec.call.method, watched)

    # ------------------------------------------------------------ collection

    @pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Group tests by the cached model they use, so that ``--dist loadgroup`` loads it once."""
        for item in items:
            for spec in self.project.models:
                if spec.cached_fixture in getattr(item, "fixturenames", ()) and not item.get_closest_marker("xdist_group"):
                    item.add_marker(pytest.mark.xdist_group(spec.name))

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        # pytest-testmon deselects stand-ins of its own that have no nodeid (FakeItemFromTestmon).
        self._deselected.update(item.nodeid for item in items if hasattr(item, "nodeid"))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Every declared model's fixtures exist: a missing one is named with the line that defines it."""
        self.selection.collected = {item.nodeid for item in session.items} | self._deselected
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
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """The run's patches (the seams' dispatchers, the guard's stand-ins) before any test's fixtures make theirs."""
        self.seams.install()
        self.blocker.install()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        """The test, under the modification check (which fails its call report for a changed shared model)."""
        self.item = item
        try:
            self.modification.run_test(item, nextitem)
        finally:
            self.item = self.policy = None
        return True

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
        """After the fixtures' teardown: the modification check of the pooled models, which restores
        the changed ones in place (a :class:`~ml_fixtures.pool.ModelRestoreError` naming the model if
        one cannot be loaded again) and releases them as the scope policy says."""
        try:
            return (yield)
        finally:
            self.modification.after_teardown(self.pool, item, nextitem)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.selection.note_report(report)

    # ------------------------------------------------------------ the end

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report = self.report
        if hasattr(self.config, "workeroutput"):
            self.config.workeroutput["ml_cassette_usage"] = {
                "tests": self.usage.to_dict(),
                "collected": sorted(self.selection.collected),
            }
        elif session.exitstatus != pytest.ExitCode.INTERRUPTED:
            self._finish_cassettes(session)
        self.pool.clear()
        report.cassettes_written = [str(p) for p in self.cassettes.save()]
        report.stale_cassettes = self.cassettes.stale(self.project.models)
        report.threads = self.threads.lines() if self.threads is not None else []
        report.finish()
        if hasattr(self.config, "workeroutput"):
            self.config.workeroutput["ml_model_report"] = report.to_dict()
        elif self.settings.report_path:
            report.write_json(self.settings.report_path)

    def _finish_cassettes(self, session: pytest.Session) -> None:
        """On the controller (or the only process): verify or accept, list the unused entries, prune, write the usage."""
        settings = self.settings
        if settings.record.verifies:
            # Real models on purpose, as in the integration tree: not a unit test's load for the report to flag.
            self.end_of_run, self.policy = f"--ml-record={settings.record.value}", Policy.INTEGRATION
            self.drift = verify.verify(
                self.cassettes, self.usage.cassettes(), self.project, self.pooled, self.environment, settings.record.value
            )
            if settings.record is RecordMode.ACCEPT:
                verify.accept(self.drift, self.cassettes)
            verify.write(self.drift, settings.drift_reports, os.environ.get("GITHUB_STEP_SUMMARY"))
            if self.drift.failed:
                _fail(session)
        if self.selection.selected_all:
            self.unused = self.cassettes.unused(self.usage.used())
        if settings.record is RecordMode.PRUNE:
            if self.selection.complete:
                self.cassettes.prune(self.unused)
                self.pruned = [self.cassettes.relative(path) for path in self.cassettes.save()]
            else:
                self.prune_refused = prune_refusal(self.selection.reasons())
                _fail(session)
        if settings.usage_path:
            cassette_dir = Path(os.path.relpath(settings.cassette_dir, self.config.rootpath)).as_posix()
            write_usage(settings.usage_path, self.usage, self.selection, cassette_dir)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("ML model loads")
        for line in self.report.summary_lines():
            terminalreporter.write_line(line)
        lines = self._cassette_lines(terminalreporter.config.option.verbose > 0)
        if lines:
            terminalreporter.section("ML cassettes")
            for line in lines:
                terminalreporter.write_line(line)

    def _cassette_lines(self, verbose: bool) -> list[str]:
        lines = verify.terminal_lines(self.drift) if self.drift else []
        if self.unused:
            lines += unused_lines(self.unused, None if verbose else 10)
            if not self.selection.complete:
                lines.append("  (" + "; ".join(self.selection.reasons()) + ": an entry only those tests use is listed too)")
            elif self.settings.record is not RecordMode.PRUNE:
                lines.append("  remove them with --ml-record=prune (a run of every test, as this one)")
        lines += [f"pruned: {path}" for path in self.pruned]
        if self.settings.record is RecordMode.PRUNE and self.selection.complete and not self.unused:
            lines.append("pruned nothing: every cassette entry was used")
        if self.prune_refused:
            lines += self.prune_refused.splitlines()
        return lines

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """On the xdist controller: merge each worker's load report and cassette usage."""
        output = getattr(node, "workeroutput", {})
        if output.get("ml_model_report"):
            self.report.merge(output["ml_model_report"])
        usage = output.get("ml_cassette_usage")
        if usage:
            self.usage.merge(usage["tests"])
            self.selection.collected.update(usage["collected"])


def _fail(session: pytest.Session) -> None:
    """A run whose cassette work failed (drift, a refused prune) exits 1 where its tests passed."""
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

