"""Recorded responses (record -> replay -> stale -> re-record) for both services, and lazy loading."""

import json

RECORDING = """
    import pytest
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models

    def test_record(test_db):
        assert SparseEmbeddingService(test_db).generate_embedding("Knead the dough and bake the bread")
        assert MLClassificationService(test_db).predict("Boil the pasta in salted water").top.label == "cooking"
"""
REPLAYING = """
    import json, os

    import pytest
    from app.services.ml_classification_service import MLClassificationService, softmax
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def recorded(model, text):
        with open(os.environ["CASSETTE"]) as f:
            return json.load(f)["models"][model]["calls"][text]

    def test_sparse_replays_the_real_weights(test_db):
        text = "Knead the dough and bake the bread"
        real = {t: w for t, w in recorded("BAAI/bge-m3", text).items() if t != "[SEP]"}
        assert SparseEmbeddingService(test_db).generate_embedding(text) == real

    def test_classifier_replays_the_real_logits(test_db):
        text = "Boil the pasta in salted water"
        logits = recorded("backend/taxonomy-classifier", text)
        expected = sorted(zip(logits, softmax(list(logits.values()))), key=lambda p: -p[1])
        result = MLClassificationService(test_db).predict(text, top_k=6)
        assert [(p.label, p.confidence) for p in result.predictions] == pytest.approx(expected)

    def test_unrecorded_texts_fall_back_to_the_fakes(test_db):
        assert set(SparseEmbeddingService(test_db).generate_embedding("zebra crossing")) == {"zebra", "crossing"}
"""


def test_record_replay_stale_and_rerecord(ml_tree):
    directory = ml_tree.root / "cassettes"
    cassette = directory / "integration" / "test_recording.json"
    ml_tree.write("integration/test_recording.py", RECORDING)
    ml_tree.write("unit/test_replaying.py", REPLAYING)
    options = (f"--ml-cassette-dir={directory}",)

    ml_tree.run("integration", "--ml-record=once", *options).assert_outcomes(passed=1)
    recorded = json.loads(cassette.read_text())
    assert set(recorded["models"]) == {"BAAI/bge-m3", "backend/taxonomy-classifier"}
    assert all(entry["fingerprint"].startswith("recipe:") for entry in recorded["models"].values())

    ml_tree.run("unit", *options, CASSETTE=str(cassette)).assert_outcomes(passed=3)
    assert ml_tree.loads()["loads"] == 0 and ml_tree.loads()["stale_cassettes"] == []

    for entry in recorded["models"].values():
        entry["fingerprint"] = "sha256:from-another-model"
    cassette.write_text(json.dumps(recorded))
    result = ml_tree.run("unit", *options, CASSETTE=str(cassette))
    result.assert_outcomes(passed=1, failed=2)  # stale cassettes are not replayed
    result.stdout.fnmatch_lines(
        ["*stale cassette (not replayed; re-record with --ml-record=once): integration/test_recording.json (BAAI/bge-m3)"]
    )
    assert ml_tree.loads()["stale_cassettes"] == [
        "integration/test_recording.json (BAAI/bge-m3)",
        "integration/test_recording.json (backend/taxonomy-classifier)",
    ]

    ml_tree.run("integration", "--ml-record=once", *options).assert_outcomes(passed=1)
    assert ml_tree.loads()["cassettes_written"] == [str(cassette)]
    ml_tree.run("unit", *options, CASSETTE=str(cassette)).assert_outcomes(passed=3)
    ml_tree.run("integration", "--ml-record=once", *options).assert_outcomes(passed=1)
    assert ml_tree.loads()["cassettes_written"] == [], "once: a current cassette is left alone"


def test_a_rerecord_without_change_is_byte_identical(ml_tree):
    directory = ml_tree.root / "cassettes"
    ml_tree.write("integration/test_recording.py", RECORDING)
    ml_tree.run("integration", "--ml-record=rewrite", f"--ml-cassette-dir={directory}").assert_outcomes(passed=1)
    first = (directory / "integration" / "test_recording.json").read_bytes()
    ml_tree.run("integration", "--ml-record=rewrite", f"--ml-cassette-dir={directory}").assert_outcomes(passed=1)
    assert (directory / "integration" / "test_recording.json").read_bytes() == first


def test_services_load_lazily_and_once_for_many_tests(ml_tree):
    ml_tree.write(
        "integration/test_lazy.py",
        """
        import pytest
        from app.services.ml_classification_service import MLClassificationService
        from app.services.sparse_embedding_service import SparseEmbeddingService

        pytestmark = pytest.mark.use_real_models

        @pytest.fixture(scope="module")
        def service():
            from sqlalchemy import create_engine
            from sqlalchemy.orm import Session
            return SparseEmbeddingService(Session(create_engine("sqlite://")))

        def test_constructing_loads_nothing(test_db):
            SparseEmbeddingService(test_db)
            MLClassificationService(test_db)

        @pytest.mark.parametrize("i", range(5))
        def test_used_many_times(service, i):
            assert service.generate_embedding(f"python {i}")
        """,
    )
    ml_tree.run("-k", "constructing").assert_outcomes(passed=1, deselected=5)
    assert ml_tree.loads()["loads"] == 0
    ml_tree.run().assert_outcomes(passed=6)
    assert [r["model"] for r in ml_tree.loads()["records"]] == ["BAAI/bge-m3 [auto, default]"]
