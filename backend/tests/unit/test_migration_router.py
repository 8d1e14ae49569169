"""The migration guide's unit example (backend/tests/docs/migration.md), before and after."""

from unittest import mock

from app.services.ml_classification_service import ClassificationResult, LabelPrediction, MLClassificationService


class Router:
    """A piece of application logic that depends on the classifier."""

    def __init__(self, classifier):
        self.classifier = classifier

    def queue_for(self, text: str) -> str:
        top = self.classifier.predict(text).top
        return top.label if top.confidence >= 0.5 else "triage"


# Before: a hand-made MagicMock, which accepts any call, even one the service lacks.
def test_router_before():
    classifier = mock.MagicMock()
    classifier.predict.return_value = ClassificationResult([LabelPrediction("finance", 0.9)], "v1")
    assert Router(classifier).queue_for("Shares fell") == "finance"
    classifier.predict_proba("a method that does not exist")  # passes silently


# After: the autospecced mock fixture, realistic values, and calls checked against the real API.
def test_router_after(mock_ml_classification_service):
    assert Router(mock_ml_classification_service).queue_for("Shares fell") == "technology"
    mock_ml_classification_service.predict.assert_called_once_with("Shares fell")


# After, logic on the fake model: the real service behind the automatic fake model.
def test_router_after_with_the_real_service(test_db):
    assert Router(MLClassificationService(test_db)).queue_for("The central bank raised interest rates") == "finance"
