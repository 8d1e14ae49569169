"""MLClassificationService's own logic, on the fake classifier behind its loading seam."""

import math

import pytest
from sqlalchemy import func, select

from app.ml.embedded import load_dataset
from app.models import Category, Resource, ResourceClassification
from app.services.ml_classification_service import ClassificationResult, MLClassificationService

LABELS = sorted({row["label"] for row in load_dataset()})


@pytest.fixture
def service(test_db):
    return MLClassificationService(test_db)


@pytest.fixture
def resource(test_db):
    row = Resource(title="Knead the dough", content="Bake the bread in a hot oven until golden")
    test_db.add(row)
    test_db.commit()
    return row


def test_construction_loads_nothing(service):
    assert service._loaded is None


def test_labels_are_the_shipped_taxonomy(service):
    assert service.labels == LABELS
    assert len(LABELS) >= 6


def test_predictions_are_sorted_and_a_probability_distribution(service):
    result = service.predict("Shares fell as the central bank raised interest rates", top_k=len(LABELS))
    assert isinstance(result, ClassificationResult)
    confidences = [p.confidence for p in result.predictions]
    assert confidences == sorted(confidences, reverse=True)
    assert math.isclose(sum(confidences), 1.0, rel_tol=1e-9)
    assert {p.label for p in result.predictions} == set(LABELS)
    assert result.top.label == "finance"
    assert result.model_version == "fake-classifier"


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_limits_the_predictions(service, top_k):
    assert len(service.predict("a football match", top_k=top_k).predictions) == top_k


@pytest.mark.parametrize("top_k", [0, -1])
def test_bad_top_k_is_a_value_error(service, top_k):
    with pytest.raises(ValueError):
        service.predict("text", top_k=top_k)


def test_batch_equals_single_calls(service):
    texts = ["Preheat the oven", "The striker scored", "A cheap flight to Lisbon"]
    assert service.predict_batch(texts) == [service.predict(t) for t in texts]


@pytest.mark.parametrize("bad", [None, 3.5, ["text"]])
def test_non_string_is_a_type_error(service, bad):
    with pytest.raises(TypeError):
        service.predict(bad)


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_a_value_error(service, text):
    with pytest.raises(ValueError):
        service.predict(text)


def test_classify_resource_stores_ranked_predictions(service, resource, test_db):
    result = service.classify_resource(resource.id)
    rows = test_db.scalars(select(ResourceClassification).order_by(ResourceClassification.rank)).all()
    assert [(r.category.name, r.confidence) for r in rows] == [(p.label, p.confidence) for p in result.predictions]
    assert result.top.label == "cooking"


def test_classifying_again_replaces_the_old_rows(service, resource, test_db):
    service.classify_resource(resource.id)
    service.classify_resource(resource.id, top_k=2)
    assert test_db.scalar(select(func.count()).select_from(ResourceClassification)) == 2
    assert test_db.scalar(select(func.count()).select_from(Category)) == 3


def test_unknown_resource_is_a_lookup_error(service):
    with pytest.raises(LookupError, match="999"):
        service.classify_resource(999)


def test_a_failure_while_writing_leaves_the_database_as_it_was(service, resource, test_db, monkeypatch):
    service.classify_resource(resource.id)
    snapshot = lambda: [  # noqa: E731
        (r.resource_id, r.category.name, r.confidence, r.rank) for r in test_db.scalars(select(ResourceClassification))
    ]
    before, categories = snapshot(), test_db.scalar(select(func.count()).select_from(Category))

    original_add = test_db.add

    def add_then_fail(obj, *args, **kwargs):
        original_add(obj, *args, **kwargs)
        if isinstance(obj, ResourceClassification) and obj.rank == 1:
            raise RuntimeError("connection lost")

    monkeypatch.setattr(test_db, "add", add_then_fail)
    resource.content = "The striker scored twice in the football match"
    with pytest.raises(RuntimeError, match="connection lost"):
        service.classify_resource(resource.id)
    monkeypatch.undo()
    assert snapshot() == before
    assert test_db.scalar(select(func.count()).select_from(Category)) == categories


def test_training_rejects_bad_examples_before_any_work(service):
    with pytest.raises(TypeError):
        service.train([("text", 1)])
    with pytest.raises(ValueError, match="two labels"):
        service.train([("a text", "sports"), ("another", "sports")])
