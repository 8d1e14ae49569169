"""Automatic mocking by directory, the marker, strict markers, graceful skips: no real model loaded."""

import types

import pytest

from ml_fixtures.seams import SeamRoutes


def test_unit_and_services_trees_get_fake_models(ml_tree):
    source = """
        from app.services.sparse_embedding_service import SparseEmbeddingService
        from app.services.ml_classification_service import MLClassificationService

        def test_fakes(test_db):
            assert type(SparseEmbeddingService(test_db).loaded.model).__name__ == "FakeBGEM3Model"
            assert type(MLClassificationService(test_db).loaded.model).__name__ == "FakeSequenceClassifier"
    """
    ml_tree.write("unit/test_a.py", source)
    ml_tree.write("services/test_b.py", source)
    ml_tree.write("integration/test_c.py", source)  # integration: fakes too, unless marked
    result = ml_tree.run()
    result.assert_outcomes(passed=3)
    assert ml_tree.loads()["loads"] == 0


def test_an_unregistered_marker_is_an_error(ml_tree):
    ml_tree.write(
        "unit/test_typo.py",
        """
        import pytest

        @pytest.mark.use_real_model
        def test_typo():
            pass
        """,
    )
    result = ml_tree.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*'use_real_model' not found in `markers` configuration option*"])


def test_an_unavailable_model_skips_with_the_reason(ml_tree):
    ml_tree.write(
        "integration/test_missing.py",
        """
        import pytest

        pytestmark = pytest.mark.use_real_models

        def test_yields_none(sparse_embedding_model_cached):
            raise AssertionError("skipped before the body runs")

        def test_also_skipped(sparse_embedding_model_cached):
            raise AssertionError("skipped before the body runs")
        """,
    )
    result = ml_tree.run("-rs", SPARSE_EMBEDDING_MODEL_PATH="/nonexistent/bge-m3")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED*sparse_embedding_model_cached: model 'BAAI/bge-m3' is unavailable:",
            "*$SPARSE_EMBEDDING_MODEL_PATH=/nonexistent/bge-m3: no such directory",
        ]
    )


def test_the_cached_fixture_yields_none_with_the_reason_kept(ml_tree):
    ml_tree.write(
        "integration/test_value.py",
        """
        import pytest
        from ml_fixtures.plugin import UnavailableModel, ml_models
        from ml_models import CLASSIFIER

        @pytest.mark.use_real_models
        def test_value(request):
            value = ml_models(request.config).cached(request, CLASSIFIER)
            assert isinstance(value, UnavailableModel)
            assert tuple(value) == (None, None, None)
            assert "/missing/clf" in value.reason
        """,
    )
    ml_tree.run(CLASSIFICATION_MODEL_PATH="/missing/clf").assert_outcomes(passed=1)


def test_mock_services_are_autospecced(ml_tree):
    ml_tree.write(
        "unit/test_mocks.py",
        """
        import pytest

        def test_missing_method(mock_ml_classification_service, mock_sparse_embedding_service):
            with pytest.raises(AttributeError):
                mock_ml_classification_service.classify("text")
            with pytest.raises(AttributeError):
                mock_sparse_embedding_service.encode("text")

        def test_realistic(mock_ml_classification_service, mock_sparse_embedding_service):
            result = mock_ml_classification_service.predict("text")
            assert result.predictions and result.predictions[0].confidence > 0
            assert mock_sparse_embedding_service.search("q")[0][1] > 0
        """,
    )
    ml_tree.run().assert_outcomes(passed=2)


def test_seams_follow_the_current_test_and_are_the_services_own_elsewhere():
    """The seams are patched once a run; per test only the route changes. Outside a test, and after the
    run, a service loads through its own seam; a test that patches the seam itself wins for that test."""
    class Service:
        def _load_model(self):
            return "own"

    spec = types.SimpleNamespace(service=Service, seam="_load_model", model_name="m")
    seams, finalizers = SeamRoutes([spec]), []
    request = types.SimpleNamespace(addfinalizer=finalizers.append)
    assert Service()._load_model() == "own"
    seams.route(request, lambda s, service: f"fake {s.model_name}")
    assert Service()._load_model() == "fake m"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Service, "_load_model", lambda service: "the test's own")
        assert Service()._load_model() == "the test's own"
    assert Service()._load_model() == "fake m"
    finalizers.pop()()
    assert Service()._load_model() == "own"
    seams.route(request, lambda s, service: "pooled")
    assert Service()._load_model() == "pooled"
    seams.release()
    assert Service()._load_model() == "own" and "_load_model" in vars(Service)


def test_a_test_that_parametrizes_the_policy_gets_each_rule_with_a_cached_fixture_too(ml_tree):
    ml_tree.write(
        "integration/test_policies.py",
        """
        import pytest

        @pytest.mark.parametrize("ml_model_policy", ["unit", "integration"])
        def test_classifier(ml_model_policy, ml_classification_model_cached):
            assert ml_classification_model_cached[0].config.id2label
        """,
    )
    result = ml_tree.run("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)  # refused at the fixture's set-up, as in a unit tree
    result.stdout.fnmatch_lines(["*test_classifier?unit? called ml_classification_model_cached.*"])
    assert "ScopeMismatch" not in result.stdout.str()
