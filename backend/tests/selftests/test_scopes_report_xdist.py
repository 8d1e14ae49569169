"""Real models through the pool: loads per scope policy, release, eviction, the report, xdist."""

import pytest

SPARSE_MODULE = """
    import weakref

    import pytest
    import refs
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models

    @pytest.mark.parametrize("i", range({n}))
    def test_sparse(sparse_embedding_model_cached, test_db, i):
        model, tokenizer, device = sparse_embedding_model_cached
        service = SparseEmbeddingService(test_db)
        assert service.loaded.model is model
        assert service.generate_embedding("python") == {{"python": pytest.approx(service.generate_embedding("python")["python"])}}
        refs.REFS.append(weakref.ref(model))
"""
CLASSIFIER_MODULE = """
    import pytest
    from app.services.ml_classification_service import MLClassificationService

    pytestmark = pytest.mark.use_real_models

    @pytest.mark.parametrize("i", range({n}))
    def test_classifier(ml_classification_model_cached, test_db, i):
        assert MLClassificationService(test_db).predict("The striker scored a goal").top.label == "sports"
"""
CHECK_RELEASE = """
    import gc

    import refs

    def test_release(request):
        gc.collect()
        alive = [ref for ref in refs.REFS if ref() is not None]
        if request.config.getoption("ml_model_scope") == "session":
            assert alive, "the session pool keeps its models"
        else:
            assert refs.REFS and not alive, "models must be released after their module"
"""

#: The trees' ini turns pytest's cache off; the workers' measured footprint is kept there.
WITH_CACHE = ("-o", "addopts=--strict-markers")


@pytest.fixture
def suite(ml_tree):
    """Two sparse modules (3 + 2 tests), one classifier module (2 tests), then a release check."""
    ml_tree.write("integration/refs.py", "REFS = []\n")
    ml_tree.write("integration/test_a_sparse.py", SPARSE_MODULE.format(n=3))
    ml_tree.write("integration/test_b_sparse.py", SPARSE_MODULE.format(n=2))
    ml_tree.write("integration/test_c_classifier.py", CLASSIFIER_MODULE.format(n=2))
    ml_tree.write("integration/test_d_release.py", CHECK_RELEASE)
    return ml_tree


def loads_per_model(report):
    return {model.split(" [")[0]: entry["loads"] for model, entry in report["per_model"].items()}


@pytest.mark.parametrize(
    "scope, sparse_loads, classifier_loads",
    [("session", 1, 1), ("module", 2, 1), ("function", 5, 2)],
)
def test_loads_per_scope_policy_and_release(suite, scope, sparse_loads, classifier_loads):
    result = suite.run(f"--ml-model-scope={scope}")
    result.assert_outcomes(passed=8)
    assert loads_per_model(suite.loads()) == {
        "BAAI/bge-m3": sparse_loads,
        "backend/taxonomy-classifier": classifier_loads,
    }


def test_the_report_in_the_terminal_and_as_json(suite):
    result = suite.run()
    result.stdout.fnmatch_lines(
        [
            "*= ML model loads =*",
            "real model loads: 2, * s loading, peak memory * MB, 0 evictions",
            "*model*loads*seconds",
            "*BAAI/bge-m3 [[]auto, default[]]*1*",
            "*backend/taxonomy-classifier [[]auto, default[]]*1*",
        ]
    )
    report = suite.loads()
    first = report["records"][0]
    assert first["test"] == "integration/test_a_sparse.py::test_sparse[0]"
    assert first["policy"] == "integration" and first["seconds"] > 0
    assert first["rss_after_mb"] > first["rss_before_mb"] > 0
    assert report["peak_rss_mb"] >= max(r["rss_after_mb"] for r in report["records"])
    assert report["outside_integration"] == []


def test_a_small_budget_evicts_the_least_recently_used(suite):
    suite.write("integration/test_e_sparse_again.py", SPARSE_MODULE.format(n=1))
    result = suite.run("--ml-model-memory-budget=150MB", "-k", "not release")
    result.assert_outcomes(passed=8, deselected=1)
    report = suite.loads()
    # ~90 MB each: the classifier evicts the sparse model, which must then load again.
    assert loads_per_model(report) == {"BAAI/bge-m3": 2, "backend/taxonomy-classifier": 1}
    assert [e.split(" (for")[0] for e in report["evictions"]] == ["BAAI/bge-m3 [auto, default]"] * 1 + [
        "backend/taxonomy-classifier [auto, default]"
    ]


@pytest.mark.slow
def test_xdist_workers_give_the_same_results_and_load_each_model_once(ml_tree):
    # Real worker processes (the claim). The classifier alone spares the workers FlagEmbedding's
    # 5 s import; its tests sit in two modules, which plain --dist load would spread over both workers.
    ml_tree.write("integration/test_a_classifier.py", CLASSIFIER_MODULE.format(n=3))
    ml_tree.write("integration/test_b_classifier.py", CLASSIFIER_MODULE.format(n=3))
    ml_tree.write(
        "unit/test_fakes.py",
        """
        import pytest
        from app.services.ml_classification_service import MLClassificationService

        @pytest.mark.parametrize("i", range(6))
        def test_fake(test_db, i):
            assert MLClassificationService(test_db).predict("The striker scored a goal").predictions
        """,
    )
    # Each worker's thread budget: its share of the CPUs, torch included (imported after it is set;
    # in the classifier's worker, which imports torch anyway).
    ml_tree.write(
        "integration/test_threads.py",
        """
        import os

        import pytest

        @pytest.mark.xdist_group("classification")
        def test_threads():
            import torch

            expected = max(1, len(os.sched_getaffinity(0)) // 2)
            assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(expected)
            assert torch.get_num_threads() == expected
        """,
    )
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        ml_tree.monkeypatch.delenv(name, raising=False)
    result = ml_tree.run("-n", "2", "--dist", "loadgroup", *WITH_CACHE)
    result.assert_outcomes(passed=13)
    result.stdout.fnmatch_lines(["ml-models: 2 xdist workers × * torch thread* each (OMP_NUM_THREADS=MKL_NUM_THREADS=*; * CPUs)"])
    report = ml_tree.loads()
    assert [(r["model"], r["policy"]) for r in report["records"]] == [
        ("backend/taxonomy-classifier [auto, default]", "integration")
    ]
    assert report["records"][0]["worker"] in {"gw0", "gw1"}
    assert {"gw0", "gw1"} <= set(report["peak_rss_mb_by_worker"])
    # The workers measured their footprint; the next -n auto of the same paths plans with it.
    result = ml_tree.run("-n", "auto", "--collect-only", *WITH_CACHE)
    result.stdout.fnmatch_lines(["ml-models: -n auto → * (limited by *MB each (measured by the last run)*"])
