"""Self-tests of the ML fixture library: pytester runs of small trees built on the real conftests.

Runs are in-process (``runpytest_inprocess``): the inner session gets its own plugin state
(pool, report, blocker) but shares this process's imports, so a self-test pays no second import
of torch, transformers and FlagEmbedding. Only the tests whose claim is process isolation
(import-light unit runs, xdist workers, racing builds) start a child process.
"""

from __future__ import annotations

import gc
import json
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_fixtures import scaffold
from ml_fixtures.parallel import THREAD_VARIABLES, THREADS_INPUT
from ml_models import PROJECT

TESTS = PROJECT.tests_dir
REPO = TESTS.parents[1]


@pytest.fixture(scope="session", autouse=True)
def ml_libraries_imported() -> None:
    """Import the ML libraries here once: pytester restores ``sys.modules`` after each in-process
    run, and torch cannot be imported a second time into one process.

    Their objects then live as long as the process: frozen out of the garbage collector, they no
    longer slow down the five collections that every inner session runs at its end (over a second
    a session with torch loaded), the way the warm server's children are spared them.
    """
    import FlagEmbedding  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def users_thread_settings(request: pytest.FixtureRequest) -> Iterator[None]:
    """The processes the self-tests start stand for a user's fresh shell: under ``-n N`` this
    worker's thread budget (parallel.py) is in ``os.environ``, where no user put it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        if getattr(request.config, "workerinput", {}).get(THREADS_INPUT):
            for name in THREAD_VARIABLES:
                monkeypatch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def signals_as_in_a_terminal() -> Iterator[None]:
    """The runs the self-tests start get SIGINT and SIGHUP as from a terminal, whatever started this
    pytest: a background job of a non-interactive shell has SIGINT ignored, ``nohup`` SIGHUP, and
    the children would inherit that (Ctrl-C and hang-up self-tests then wait in vain)."""
    ignored = [signum for signum in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(signum) == signal.SIG_IGN]
    for signum in ignored:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    yield
    for signum in ignored:
        signal.signal(signum, signal.SIG_IGN)


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    """The self-tests load models only inside the sessions they run, each with its own guard."""
    return "integration"


class MLTree:
    """A throwaway test tree with the repository's real conftests."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
        self.pytester, self.monkeypatch = pytester, monkeypatch
        self.root = pytester.path
        self.report = self.root / "ml-report.json"
        scaffold.lay_out(self.root, PROJECT)

    def write(self, relpath: str, source: str) -> Path:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    def _env(self, env: dict[str, str]) -> None:
        for key, value in env.items():
            self.monkeypatch.setenv(key, value)

    def run(self, *args: str, **env: str) -> pytest.RunResult:
        """Run pytest on the tree in this process (``env`` is added to the environment)."""
        self._env(env)
        return self.pytester.runpytest_inprocess(f"--ml-model-report={self.report}", *args)

    def run_in_subprocess(self, *args: str, **env: str) -> pytest.RunResult:
        """Run pytest on the tree in a fresh process: for claims about what a process imports."""
        self._env(env)
        return self.pytester.runpytest_subprocess(f"--ml-model-report={self.report}", *args, timeout=300)

    def loads(self) -> dict:
        return json.loads(self.report.read_text())


@pytest.fixture
def ml_tree(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> MLTree:
    """A pytester tree laid out like backend/tests, with the real conftests copied in."""
    return MLTree(pytester, monkeypatch)
