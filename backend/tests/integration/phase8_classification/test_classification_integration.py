"""MLClassificationService on the real classifier fine-tuned from the packaged MiniLM."""

import json
import math

import pytest

from app.ml import ModelUnavailableError
from app.ml.embedded import dataset_examples
from app.models import Resource, ResourceClassification
from app.services.ml_classification_service import MLClassificationService

pytestmark = pytest.mark.use_real_models


@pytest.fixture
def service(test_db):
    return MLClassificationService(test_db)


def test_the_fixture_yields_model_tokenizer_and_device(ml_classification_model_cached):
    model, tokenizer, device = ml_classification_model_cached
    assert model.config.model_version.startswith("all-MiniLM-L6-v2-ft-")
    assert tokenizer("hello")["input_ids"]
    assert str(model.device).startswith(device)


def test_the_service_uses_the_very_same_model(ml_classification_model_cached, service):
    assert service.loaded.model is ml_classification_model_cached[0]


def test_accuracy_on_held_back_texts(service):
    held_back = dataset_examples("test")
    predictions = service.predict_batch([text for text, _ in held_back], top_k=1)
    correct = sum(p.top.label == label for p, (_, label) in zip(predictions, held_back))
    assert correct / len(held_back) >= 0.8, f"{correct}/{len(held_back)} correct"


def test_confidences_are_a_softmax_over_all_labels(service):
    result = service.predict("The goalkeeper saved a penalty", top_k=len(service.labels))
    confidences = [p.confidence for p in result.predictions]
    assert math.isclose(sum(confidences), 1.0, rel_tol=1e-5)
    assert confidences == sorted(confidences, reverse=True)


def test_batch_equals_single_calls(service, model_output_tolerance):
    texts = ["Boil the pasta in salted water", "The central bank raised interest rates"]
    for batched, single in zip(service.predict_batch(texts), [service.predict(t) for t in texts]):
        assert [p.label for p in batched.predictions] == [p.label for p in single.predictions]
        assert [p.confidence for p in batched.predictions] == pytest.approx(
            [p.confidence for p in single.predictions], abs=model_output_tolerance
        )


def test_long_and_unicode_texts_work(service):
    assert service.predict("football " * 2000).top.label == "sports"
    assert service.predict("Crème brûlée, 日本語 😀").predictions


def test_classify_resource_stores_predictions(service, test_db):
    resource = Resource(title="Marathon", content="Runners battled heat over the final ten kilometres")
    test_db.add(resource)
    test_db.commit()
    result = service.classify_resource(resource.id)
    stored = test_db.query(ResourceClassification).filter_by(resource_id=resource.id, rank=0).one()
    assert stored.category.name == result.top.label == "sports"
    assert stored.model_version == result.model_version


def test_train_saves_a_model_with_label_map_and_version(tmp_path, test_db):
    examples = [(text, label) for text, label in dataset_examples("train") if label in ("sports", "cooking")][::4]
    service = MLClassificationService(test_db, model_path=tmp_path / "clf")
    version = service.train(examples, epochs=2)
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["model_version"] == version
    assert set(config["id2label"].values()) == {"sports", "cooking"}
    result = service.predict("a text", top_k=5)
    assert result.model_version == version
    assert {p.label for p in result.predictions} == {"sports", "cooking"}


def test_a_corrupt_model_is_a_model_unavailable_error_naming_the_path(tmp_path, test_db):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelUnavailableError, match=str(tmp_path)):
        MLClassificationService(test_db, model_path=tmp_path).predict("text")
