"""The model resolver: explicit path, Hugging Face cache (offline), embedded default, clear errors."""

import pytest

from app.ml import ModelUnavailableError, resolve_model_path
from app.ml.loading import select_device, use_fp16
from app.ml.resolver import ModelSource


def source(embedded=None):
    return ModelSource(name="acme/encoder", env_var="ACME_MODEL_PATH", required_files=("config.json",), embedded=embedded)


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants  # read at call time, unlike $HF_HUB_CACHE

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("ACME_MODEL_PATH", raising=False)
    monkeypatch.delenv("ML_ALLOW_DOWNLOAD", raising=False)


def test_an_explicit_path_wins(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("ACME_MODEL_PATH", str(tmp_path))
    assert resolve_model_path(source(embedded=lambda build: pytest.fail("not reached"))) == tmp_path


def test_an_explicit_path_that_does_not_exist_is_named(monkeypatch):
    monkeypatch.setenv("ACME_MODEL_PATH", "/no/such/model")
    with pytest.raises(ModelUnavailableError, match=r"\$ACME_MODEL_PATH=/no/such/model: no such directory"):
        resolve_model_path(source())


def test_missing_files_in_an_explicit_path_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ACME_MODEL_PATH", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="missing config.json"):
        resolve_model_path(source())


def test_the_hugging_face_cache_is_used_offline(tmp_path):
    snapshot = tmp_path / "hf" / "models--acme--encoder" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hf" / "models--acme--encoder" / "refs").mkdir()
    (tmp_path / "hf" / "models--acme--encoder" / "refs" / "main").write_text("abc123")
    assert resolve_model_path(source()) == snapshot


def test_the_embedded_default_comes_after_the_cache(tmp_path):
    assert resolve_model_path(source(embedded=lambda build: tmp_path)) == tmp_path


def test_nothing_found_lists_every_place_tried_and_how_to_provide_it():
    with pytest.raises(ModelUnavailableError) as error:
        resolve_model_path(source())
    message = str(error.value)
    assert "model 'acme/encoder' is unavailable" in message
    assert "$ACME_MODEL_PATH: not set" in message
    assert "Hugging Face cache (offline)" in message
    assert "embedded default: none for this model name" in message
    assert "download: disabled (set ML_ALLOW_DOWNLOAD=1 to allow)" in message
    assert "setting ACME_MODEL_PATH" in message


def test_a_failing_embedded_build_is_reported():
    def broken(build):
        raise OSError("disk full")

    with pytest.raises(ModelUnavailableError, match="embedded default: OSError: disk full"):
        resolve_model_path(source(embedded=broken))


def test_fp16_only_on_cuda():
    assert use_fp16("cuda", None) and use_fp16("cuda:1", None)
    assert not use_fp16("cuda", "fp32") and not use_fp16("cpu", None)


def test_int8_runs_on_the_cpu():
    assert select_device(None, "int8") == "cpu"
    with pytest.raises(ValueError, match="CPU"):
        select_device("cuda", "int8")


def test_a_saved_model_comes_before_the_cache(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = ModelSource("acme/encoder", "ACME_MODEL_PATH", ("config.json",), saved=lambda: tmp_path)
    assert resolve_model_path(source) == tmp_path


def test_the_classifier_looks_in_the_models_dir(tmp_path, monkeypatch):
    from app.ml import CLASSIFICATION

    monkeypatch.delenv("CLASSIFICATION_MODEL_PATH", raising=False)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    (tmp_path / "classification").mkdir()
    (tmp_path / "classification" / "config.json").write_text("{}")
    assert resolve_model_path(CLASSIFICATION, build=False) == tmp_path / "classification"
