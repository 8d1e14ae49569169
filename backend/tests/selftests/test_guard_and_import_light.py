"""The unit-tree guard's message, real loads reported outside integration, and import-light unit runs."""

import json
import sys
import types

import pytest

from ml_fixtures.guard import BlockedTest, ModelBlocker
from selftests.conftest import REPO, TESTS

GUARDED = """
    import pytest
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def test_app_loader():
        from app.ml import loading
        loading.load_sparse_embedding_model()

    def test_torch_load(tmp_path):
        import torch  # imported after the guard was installed: patched on import
        torch.load(tmp_path / "weights.pt", weights_only=True)

    def test_from_pretrained():
        from transformers import AutoModel
        AutoModel.from_pretrained("BAAI/bge-m3")

    def test_flag_embedding():
        from FlagEmbedding import BGEM3FlagModel
        BGEM3FlagModel("BAAI/bge-m3")

    def test_cached_fixture(sparse_embedding_model_cached):
        pass

    @pytest.mark.use_real_models
    def test_marked_may_load(test_db):
        assert SparseEmbeddingService(test_db).generate_embedding("python")

    def test_refused_models_leave_nothing_that_complains_when_collected():
        import gc
        gc.collect()
"""


def test_real_loads_in_unit_trees_fail_naming_the_marker(ml_tree):
    ml_tree.write("unit/test_guarded.py", GUARDED)
    # A refused construction's half-built model must not raise from its finalizer (see guard._disarm).
    result = ml_tree.run("-W", "error::pytest.PytestUnraisableExceptionWarning")
    result.assert_outcomes(failed=4, errors=1, passed=2)
    for what in [
        "app.ml.loading.load_sparse_embedding_model",
        "torch.load",
        "transformers.models.auto.auto_factory._BaseAutoModelClass.from_pretrained",
        "FlagEmbedding.inference.embedder.encoder_only.m3.M3Embedder.__init__",
        "sparse_embedding_model_cached",
    ]:
        result.stdout.fnmatch_lines(
            [
                f"Real model load not allowed in this test: unit/test_guarded.py::* called {what}.",
                'Tests in unit/ run on fake models: ml_model_policy is "unit" there.',
                "Mark the test with @pytest.mark.use_real_models to load real models, *ml_model_blocker.unblock()*",
            ]
        )
    result.stdout.fnmatch_lines(
        ["*outside the integration tree: unit/test_guarded.py::test_marked_may_load loaded BAAI/bge-m3*"]
    )
    outside = ml_tree.loads()["outside_integration"]
    assert [r["test"] for r in outside] == ["unit/test_guarded.py::test_marked_may_load"]


def test_the_guard_patches_once_a_run_and_catches_loaders_that_come_later(tmp_path, monkeypatch):
    """Patched at the first blocked test, not per test: a loader module imported during a test, and a subclass
    with its own copy of a loader imported between tests, are blocked all the same; unblocked, the stand-ins
    are the real loaders; the run's end puts every loader back."""
    (tmp_path / "late_loaders.py").write_text(
        "class Loader:\n    @classmethod\n    def from_pretrained(cls, name):\n        return name\n"
    )
    (tmp_path / "late_subclass.py").write_text(
        "from late_loaders import Loader\n\nclass Own(Loader):\n"
        "    @classmethod\n    def from_pretrained(cls, name):\n        return 'own ' + name\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    blocker, finalizers = ModelBlocker({"late_loaders": ("Loader.from_pretrained",)}), []
    request, test = types.SimpleNamespace(addfinalizer=finalizers.append), BlockedTest("unit/t.py::t", "unit/", "unit")
    try:
        blocker.guard_test(request, test)
        import late_loaders

        with pytest.raises(pytest.fail.Exception, match="called late_loaders.Loader.from_pretrained"):
            late_loaders.Loader.from_pretrained("x")
        finalizers.pop()()
        assert late_loaders.Loader.from_pretrained("x") == "x"
        import late_subclass

        blocker.guard_test(request, test)
        with pytest.raises(pytest.fail.Exception, match="called late_loaders.Loader.from_pretrained"):
            late_subclass.Own.from_pretrained("x")
        finalizers.pop()()
        assert late_subclass.Own.from_pretrained("x") == "own x"
    finally:
        blocker.release()
        for name in ("late_loaders", "late_subclass"):
            sys.modules.pop(name, None)
    assert not hasattr(late_loaders.Loader.from_pretrained, "ml_model_blocker")
    assert not hasattr(late_subclass.Own.from_pretrained, "ml_model_blocker")
    assert blocker._hook not in sys.meta_path


@pytest.mark.slow
def test_the_unit_and_services_trees_never_import_ml_libraries(ml_tree):
    ml_tree.write(
        "heavy_import_probe.py",
        """
        import json, os, sys

        HEAVY = ("torch", "transformers", "FlagEmbedding")

        def _write(stage):
            with open(os.environ["PROBE_OUT"], "a") as f:
                f.write(json.dumps([stage, sorted(m for m in HEAVY if m in sys.modules)]) + "\\n")

        def pytest_collection_finish(session):
            _write("collection")

        def pytest_sessionfinish(session):
            _write("session")
        """,
    )
    probe = ml_tree.root / "probe.jsonl"
    result = ml_tree.run_in_subprocess(
        "-p", "heavy_import_probe", "-c", str(REPO / "pytest.ini"), "--rootdir", str(REPO),
        str(TESTS / "unit"), str(TESTS / "services"),
        PROBE_OUT=str(probe),
    )
    assert result.ret == 0
    stages = [json.loads(line) for line in probe.read_text().splitlines()]
    assert stages == [["collection", []], ["session", []]]
    assert ml_tree.loads()["loads"] == 0


def test_two_wrapping_finders_ask_each_other_once(tmp_path, monkeypatch):
    """The guard's import hook and the record's untraced imports each ask the rest of sys.meta_path:
    a loader module imported while both are in (a blocked test in a traced run) imports once, wrapped by both."""
    from ml_fixtures.import_hooks import WrappingFinder

    class Counting(WrappingFinder):
        def __init__(self):
            super().__init__()
            self.wrapped = []

        def find_spec(self, fullname, path, target=None):
            if fullname != "wrapped_twice":
                return None
            spec = self.spec_from_the_others(fullname, path, target)
            if spec is not None:
                self.wrapped.append(fullname)
            return spec

    (tmp_path / "wrapped_twice.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(tmp_path)
    first, second = Counting(), Counting()
    monkeypatch.setattr(sys, "meta_path", [first, second, *sys.meta_path])
    try:
        import wrapped_twice
    finally:
        sys.modules.pop("wrapped_twice", None)
    assert wrapped_twice.VALUE == 1 and first.wrapped == second.wrapped == ["wrapped_twice"]


def test_a_shared_fixture_of_a_unit_test_is_guarded_as_the_test_is(ml_tree):
    """A module-scoped fixture is set up before the fixture that blocks the test: its real load fails
    the same way, naming the marker; building a service there is not loading (its test gets fakes).
    Inside ``ml_model_blocker.unblock()`` a shared fixture loads: test_safe_sharing's BLOCKER."""
    ml_tree.write(
        "unit/test_shared_fixture.py",
        """
        import pytest
        from app.ml import loading
        from app.services.ml_classification_service import MLClassificationService

        @pytest.fixture(scope="module")
        def loaded_at_module_scope():
            return loading.load_classification_model()

        @pytest.fixture(scope="module")
        def built_at_module_scope():
            return MLClassificationService(None)

        def test_unmarked(loaded_at_module_scope):
            pass

        def test_building_is_not_loading(built_at_module_scope):
            assert type(built_at_module_scope.loaded.model).__name__ == "FakeSequenceClassifier"
        """,
    )
    result = ml_tree.run("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*test_unmarked called app.ml.loading.load_classification_model.*", "*@pytest.mark.use_real_models*"]
    )
