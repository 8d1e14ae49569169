"""The generated suite the benchmark runs: integration modules on both models, unit modules on fakes."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from ml_fixtures import scaffold
from ml_models import PROJECT


@dataclass(frozen=True)
class Sizes:
    sparse_modules: int = 20
    classifier_modules: int = 10
    unit_modules: int = 30
    tests_per_integration_module: int = 5
    tests_per_unit_module: int = 10

    @property
    def integration_tests(self) -> int:
        return (self.sparse_modules + self.classifier_modules) * self.tests_per_integration_module

    @property
    def unit_tests(self) -> int:
        return self.unit_modules * self.tests_per_unit_module


SPARSE_TEST = """
    import pytest
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models

    @pytest.mark.parametrize("i", range({n}))
    def test_sparse(sparse_model, test_db, i):
        service = SparseEmbeddingService(test_db)
        assert service.loaded.model is sparse_model[0]
        assert service.generate_embedding(f"python programming lesson {{i}}")["python"] > 0
"""
CLASSIFIER_TEST = """
    import pytest
    from app.services.ml_classification_service import MLClassificationService

    pytestmark = pytest.mark.use_real_models

    @pytest.mark.parametrize("i", range({n}))
    def test_classifier(classifier_model, test_db, i):
        service = MLClassificationService(test_db)
        assert service.loaded.model is classifier_model[0]
        assert service.predict(f"The striker scored goal number {{i}}").top.label == "sports"
"""
UNIT_TEST = """
    import pytest
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    @pytest.mark.parametrize("i", range({n}))
    def test_unit(test_db, i):
        assert SparseEmbeddingService(test_db).generate_embedding(f"python lesson {{i}}")
        assert MLClassificationService(test_db).predict("Bake the bread in the oven").predictions
"""
#: The floor of the unit section: what pytest itself costs a test that needs nothing.
TRIVIAL_TEST = """
    import pytest

    @pytest.mark.parametrize("i", range({n}))
    def test_trivial(i):
        assert i >= 0
"""
#: At the seed's scale the weights are random: the test checks the model call, not a token's weight.
SCALE_TEST = """
    import pytest
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models

    @pytest.mark.parametrize("i", range({n}))
    def test_sparse(sparse_model, test_db, i):
        service = SparseEmbeddingService(test_db)
        assert service.loaded.model is sparse_model[0]
        assert isinstance(service.generate_embedding(f"python programming lesson {{i}}"), dict)
"""
#: The fixture library's way: the cached fixtures, served by the pool.
POOLED_FIXTURES = """

@pytest.fixture
def sparse_model(sparse_embedding_model_cached):
    return sparse_embedding_model_cached


@pytest.fixture
def classifier_model(ml_classification_model_cached):
    return ml_classification_model_cached
"""
#: The sentence-transformers test-suite pattern: one session model, a deepcopy per test.
PEER_FIXTURES = """

import copy

from app.ml import LoadedModel, loading
from app.services.ml_classification_service import MLClassificationService
from app.services.sparse_embedding_service import SparseEmbeddingService


@pytest.fixture(scope="session")
def _sparse_session_model():
    return loading.load_sparse_embedding_model()


@pytest.fixture(scope="session")
def _classifier_session_model():
    return loading.load_classification_model()


def _copy_into(service_class, loaded, monkeypatch):
    copied = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.device)
    monkeypatch.setattr(service_class, "_load_model", lambda self: copied)
    return copied


@pytest.fixture
def sparse_model(_sparse_session_model, monkeypatch):
    return _copy_into(SparseEmbeddingService, _sparse_session_model, monkeypatch)


@pytest.fixture
def classifier_model(_classifier_session_model, monkeypatch):
    return _copy_into(MLClassificationService, _classifier_session_model, monkeypatch)
"""
#: No fixture library at all: only a database; every service loads its own model.
BARE_CONFTEST = """
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from app.models import Base


@pytest.fixture
def test_db():
    engine = create_engine("sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
"""


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def generate(
    root: Path, sizes: Sizes, integration_fixtures: str = POOLED_FIXTURES, sparse_test: str = SPARSE_TEST
) -> None:
    """Lay out the suite under ``root`` with the real conftests and the given model fixtures."""
    scaffold.lay_out(root, PROJECT)
    with (root / "integration" / "conftest.py").open("a") as conftest:
        conftest.write(integration_fixtures)
    n = sizes.tests_per_integration_module
    for i in range(sizes.sparse_modules):
        _write(root / "integration" / f"test_sparse_{i:02d}.py", sparse_test.format(n=n))
    for i in range(sizes.classifier_modules):
        _write(root / "integration" / f"test_classifier_{i:02d}.py", CLASSIFIER_TEST.format(n=n))
    for i in range(sizes.unit_modules):
        _write(root / "unit" / f"test_unit_{i:02d}.py", UNIT_TEST.format(n=sizes.tests_per_unit_module))


def generate_bare_unit(root: Path, sizes: Sizes) -> None:
    """The unit modules alone, with no fixture library: the state before it."""
    _write(root / "conftest.py", BARE_CONFTEST)
    (root / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    for i in range(sizes.unit_modules):
        _write(root / "unit" / f"test_unit_{i:02d}.py", UNIT_TEST.format(n=sizes.tests_per_unit_module))


def generate_trivial_unit(root: Path, sizes: Sizes) -> None:
    """As many trivial tests as the unit modules hold, in as many modules, in a bare directory: pytest's own cost."""
    (root / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    for i in range(sizes.unit_modules):
        _write(root / "unit" / f"test_trivial_{i:02d}.py", TRIVIAL_TEST.format(n=sizes.tests_per_unit_module))
