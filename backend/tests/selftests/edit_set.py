"""An edit set for test selection: a scratch copy of this repository's application and test set-up,
a few tests of each kind, and the edits a developer makes (a service's logic, a fake, a cassette
entry, a dataset the embedded models are built from, a conftest, the model declaration, a docstring,
a test, a new test, a deleted test, a module-level constant, a data file a test reads).

``test_affected_edits.py`` checks that, for every edit, each test that fails in a full run is among
those ``--ml-affected`` runs; ``benchmarks/selection.py`` counts what ours and pytest-testmon select.
The scratch tree is a git repository (the baseline committed), so an edit is undone with git.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ml_models import PROJECT

TESTS = PROJECT.tests_dir
BACKEND = TESTS.parent

UNIT = '''
    import json
    from pathlib import Path

    import pytest

    from app.services.common import require_text
    from app.services.ml_classification_service import MLClassificationService
    from app.services.rerank_service import RerankService
    from app.services.sparse_embedding_service import SparseEmbeddingService


    def test_recorded_weights_are_replayed(test_db):
        weights = SparseEmbeddingService(test_db).generate_embedding("bank interest rates and monetary policy")
        assert weights["interest"] == pytest.approx(0.41895)


    def test_recorded_label_is_replayed(test_db):
        assert MLClassificationService(test_db).predict("Boil the pasta in salted water").top.label == "cooking"


    def test_made_up_label_of_an_unrecorded_text(test_db):
        expected = json.loads((Path(__file__).parent / "data" / "expected.json").read_text())
        label = MLClassificationService(test_db).predict("The goalkeeper saved a penalty in the final").top.label
        assert label == expected["goalkeeper"]


    def test_rerank_order(test_db):
        texts = ["We walked along the river at dawn", "The central bank raised interest rates to fight inflation"]
        assert [i for i, _ in RerankService(test_db).rerank("bank interest rates", texts)] == [1, 0]


    def test_require_text():
        with pytest.raises(TypeError):
            require_text(3)


    def test_to_be_deleted():
        assert require_text("kept") == "kept"
'''
SERVICES = '''
    from app.models import Resource
    from app.services.sparse_embedding_service import SparseEmbeddingService


    def test_search_finds_the_bank_text(test_db):
        test_db.add_all([Resource(id=1, title="Bank", content="The central bank raised interest rates"),
                         Resource(id=2, title="River", content="We walked along the river bank at dawn")])
        service = SparseEmbeddingService(test_db)
        for resource_id in (1, 2):
            service.embed_resource(resource_id)
        assert service.search("interest rates")[0][0] == 1
'''
INTEGRATION = '''
    import pytest

    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models


    def test_real_sparse_weights(test_db):
        weights = SparseEmbeddingService(test_db).generate_embedding("python programming lesson")
        assert weights["python"] > 0 and "the" not in weights


    def test_real_label(test_db):
        assert MLClassificationService(test_db).predict("The striker scored a goal in the final").top.label == "sports"
'''
#: Every test of the scratch tree, by node id.
ALL_TESTS = {
    *(f"backend/tests/unit/test_units.py::{name}" for name in re.findall(r"def (test_\w+)", UNIT)),
    "backend/tests/services/test_flow.py::test_search_finds_the_bank_text",
    "backend/tests/integration/test_real.py::test_real_sparse_weights",
    "backend/tests/integration/test_real.py::test_real_label",
}


def lay_out(root: Path) -> None:
    """The scratch repository: the application, the test set-up, the cassettes, the tests above; committed."""
    shutil.copytree(BACKEND / "app", root / "backend" / "app", ignore=shutil.ignore_patterns("__pycache__"))
    tests = root / "backend" / "tests"
    shutil.copytree(TESTS / "cassettes", tests / "cassettes")
    for name in ("conftest.py", "ml_models.py", "fake_models.py", *(f"{tree}/conftest.py" for tree in PROJECT.trees)):
        (tests / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TESTS / name, tests / name)
    sources = {"unit/test_units.py": UNIT, "services/test_flow.py": SERVICES, "integration/test_real.py": INTEGRATION}
    for path, source in sources.items():
        (tests / path).write_text(textwrap.dedent(source).lstrip())
    (tests / "unit" / "data").mkdir()
    (tests / "unit" / "data" / "expected.json").write_text(json.dumps({"goalkeeper": "sports"}) + "\n")
    # The scratch's own modules first, then this checkout's tests directory for the library (ml_fixtures).
    (root / "pytest.ini").write_text(
        f"[pytest]\npythonpath = backend backend/tests {TESTS}\ntestpaths = backend/tests\n"
        "addopts = -p ml_fixtures.plugin -p no:postgresql --strict-markers\n"
    )
    (root / ".gitignore").write_text(".pytest_cache/\n__pycache__/\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=edit-set", "-c", "user.email=edit-set@localhost", "commit", "-qm", "baseline")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def undo(root: Path) -> None:
    """Back to the baseline commit (the edit's files, new ones too)."""
    git(root, "checkout", "-q", "--", ".")
    git(root, "clean", "-qfd", "--exclude=.pytest_cache")


def append(path: str, text: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        with open(root / path, "a") as file:
            file.write(text)

    return apply


def write(path: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / path).write_text(text)


def replace(path: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        file = root / path
        text = file.read_text()
        assert old in text, f"{path} no longer holds {old!r}: the edit set needs updating"
        file.write_text(text.replace(old, new, 1))

    return apply


@dataclass(frozen=True)
class Edit:
    kind: str
    apply: Callable[[Path], None]
    #: Where the edit can only affect these, a selection of more is imprecise (None: no such bound).
    selects_at_most: frozenset[str] | None = None
    #: It makes a test fail (else the set would check nothing): all but the docstring and the deletion do.
    breaks: bool = True


SERVICE = "backend/app/services/sparse_embedding_service.py"
FAKES = "backend/tests/fake_models.py"
CASSETTE = "backend/tests/cassettes/integration/phase9_reranking/test_rerank_integration.json"
UNITS = "backend/tests/unit/test_units.py"
DELETED = 'def test_to_be_deleted():\n    assert require_text("kept") == "kept"\n'
DECLARATION = "backend/tests/ml_models.py"
EDITS = (
    Edit("a service's logic", replace(SERVICE, "return sum(weight * document[token]", "return -sum(weight * document[token]")),
    Edit("a fake", replace(FAKES, "return [2.0 * len(words & vocabulary[", "return [-2.0 * len(words & vocabulary[")),
    Edit("a cassette entry", replace(CASSETTE, '"interest": 0.41895', '"interest": 0.5')),
    Edit(
        "a dataset the embedded models are built from",
        replace("backend/app/ml/data/function_words.txt", "\n", "\ninterest\n"),
    ),
    Edit(
        "a conftest",
        append(
            "backend/tests/unit/conftest.py",
            "\n\n@pytest.fixture(autouse=True)\ndef no_require(request):\n    assert 'require' not in request.node.name\n",
        ),
    ),
    Edit("the model declaration", replace(DECLARATION, "fake=fake_rerank_model,", "fake=fake_sparse_embedding_model,")),
    Edit(
        "a docstring only",
        replace("backend/app/services/common.py", "def require_text(text: object, what: str = \"text\") -> str:\n",
                "def require_text(text: object, what: str = \"text\") -> str:\n    \"\"\"The text, if it is one.\"\"\"\n"),
        selects_at_most=frozenset(),
        breaks=False,
    ),  # fmt: skip
    Edit(
        "a test",
        replace(UNITS, "== [1, 0]", "== [0, 1]"),
        selects_at_most=frozenset({f"{UNITS}::test_rerank_order"}),
    ),
    Edit(
        "a new test",
        write("backend/tests/services/test_new.py", "def test_new():\n    assert 6 * 7 == 41\n"),
        selects_at_most=frozenset({"backend/tests/services/test_new.py::test_new"}),
    ),
    Edit("a deleted test", replace(UNITS, DELETED, ""), breaks=False),
    Edit(
        "a module-level constant",
        replace("backend/app/services/ml_classification_service.py", "    max_length = 256\n", "    max_length = 3\n"),
    ),
    Edit("a data file a test reads", replace("backend/tests/unit/data/expected.json", '"sports"', '"finance"')),
)


class Scratch:
    """The scratch repository and its runs: warm by default (``python``: another interpreter, e.g. a
    virtualenv with pytest-testmon; ``warm``: off, for plugins of its own)."""

    def __init__(self, root: Path, warm_dir: Path, python: str = sys.executable, warm: bool = True):
        self.root, self.python, self.warm = root, python, warm
        self.env = {**os.environ, "ML_WARM_DIR": str(warm_dir), "PYTHONDONTWRITEBYTECODE": ""}
        lay_out(root)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        command = [self.python, "-m", "pytest", *(["--ml-warm"] if self.warm else []), "-q", *args]
        return subprocess.run(command, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=600)

    def selected(self, *args: str, selector: tuple[str, ...] = ("--ml-affected",)) -> tuple[set[str], str]:
        """The node ids a collection-only run with ``selector`` keeps."""
        done = self.run("--co", *selector, *args)
        if done.returncode not in (0, 5):
            raise RuntimeError(f"pytest --co {' '.join(selector)} failed:\n{done.stdout}{done.stderr}")
        return {line for line in done.stdout.splitlines() if "::" in line and " " not in line}, done.stdout

    def failing(self) -> set[str]:
        """The tests that fail (or error) in a full run that records nothing."""
        done = self.run("-p", "no:cacheprovider", "-rfE")
        return set(re.findall(r"^(?:FAILED|ERROR) (\S+::\S+)", done.stdout, re.MULTILINE))
