"""Sharing one model safely: the guard per test, modified shared models, private copies, the blocker,
strict replay, and options checked as enums."""

import sys

import pytest

MARKED_THEN_UNMARKED = """
    import pytest
    from app.services.sparse_embedding_service import SparseEmbeddingService

    @pytest.mark.use_real_models
    def test_marked(sparse_embedding_model_cached, test_db):
        assert SparseEmbeddingService(test_db).loaded.model is sparse_embedding_model_cached[0]

    def test_unmarked(sparse_embedding_model_cached):
        raise AssertionError("the guard fails the test before its body")

    def test_service_after(test_db):
        assert type(SparseEmbeddingService(test_db).loaded.model).__name__ == "FakeBGEM3Model"
"""


def test_the_guard_decides_per_test_not_per_fixture_set_up(ml_tree):
    ml_tree.write("unit/test_order.py", MARKED_THEN_UNMARKED)
    result = ml_tree.run()
    result.assert_outcomes(passed=2, errors=1)  # refused at set-up, before its body
    result.stdout.fnmatch_lines(
        [
            "*Real model load not allowed in this test: unit/test_order.py::test_unmarked called sparse_embedding_model_cached.",
            '*Tests in unit/ run on fake models: ml_model_policy is "unit" there.',
            "*@pytest.mark.use_real_models*",
        ]
    )
    assert ml_tree.loads()["loads"] == 1


def test_an_unmarked_first_test_loads_nothing_and_breaks_no_later_test(ml_tree):
    ml_tree.write(
        "services/test_first.py",
        """
        import pytest

        def test_unmarked(ml_classification_model_cached):
            raise AssertionError("not reached")

        @pytest.mark.use_real_models
        def test_marked_after(ml_classification_model_cached):
            assert ml_classification_model_cached.model.config.id2label
        """,
    )
    result = ml_tree.run("-k", "unmarked")
    result.assert_outcomes(errors=1, deselected=1)
    result.stdout.fnmatch_lines(["*services/test_first.py::test_unmarked called ml_classification_model_cached.*"])
    assert ml_tree.loads()["loads"] == 0
    ml_tree.run().assert_outcomes(errors=1, passed=1)


def test_module_scoped_user_fixtures_on_the_cached_fixtures_keep_working(ml_tree):
    source = """
        import pytest
        from app.services.sparse_embedding_service import SparseEmbeddingService

        pytestmark = pytest.mark.use_real_models

        @pytest.fixture(scope="module")
        def vocabulary_size(sparse_embedding_model_cached):
            return len(sparse_embedding_model_cached.tokenizer)

        @pytest.mark.parametrize("i", range(3))
        def test_uses_it(vocabulary_size, test_db, i):
            assert vocabulary_size > 1000
            assert SparseEmbeddingService(test_db).generate_embedding("python")
    """
    ml_tree.write("integration/test_user_fixture.py", source)
    ml_tree.write("unit/test_user_fixture_marked.py", source)
    ml_tree.run().assert_outcomes(passed=6)
    assert ml_tree.loads()["loads"] == 1


MODIFYING = """
    import pytest
    import torch
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models

    def first_weight(loaded):
        return next(loaded.model.model.parameters())

    def test_zeroes_a_weight(sparse_embedding_model_cached):
        with torch.no_grad():
            first_weight(sparse_embedding_model_cached).mul_(0)

    def test_after_the_zeroing(sparse_embedding_model_cached, test_db):
        assert first_weight(sparse_embedding_model_cached).abs().sum() > 0
        assert SparseEmbeddingService(test_db).loaded.model is sparse_embedding_model_cached.model

    def test_leaves_training_mode_on(ml_classification_model_cached):
        ml_classification_model_cached.model.train()

    def test_after_training_mode(ml_classification_model_cached, test_db):
        assert not ml_classification_model_cached.model.training
        assert MLClassificationService(test_db).predict("The striker scored a goal").top.label == "sports"

    def test_writes_through_data(ml_classification_model_cached):
        for parameter in ml_classification_model_cached.model.classifier.parameters():
            parameter.data.zero_()  # no version bump: the written pages tell

    def test_after_the_data_write(ml_classification_model_cached):
        assert ml_classification_model_cached.model.classifier.weight.abs().sum() > 0

    def test_replaces_a_head(ml_classification_model_cached):
        ml_classification_model_cached.model.classifier = torch.nn.Linear(384, 6)

    def test_after_the_new_head(ml_classification_model_cached):
        assert ml_classification_model_cached.model.classifier.out_features == 6
        assert MLClassificationService.__name__  # the module-scoped value is the cleaned model

    def test_a_private_copy_may_change(sparse_embedding_model_copy, sparse_embedding_model_cached, test_db):
        assert sparse_embedding_model_copy.model is not sparse_embedding_model_cached.model
        with torch.no_grad():
            first_weight(sparse_embedding_model_copy).mul_(0)
        assert SparseEmbeddingService(test_db).loaded.model is sparse_embedding_model_copy.model

    def test_after_the_copy(sparse_embedding_model_cached):
        assert first_weight(sparse_embedding_model_cached).abs().sum() > 0
"""


def test_a_test_that_modifies_a_shared_model_fails_and_the_next_gets_a_clean_one(ml_tree):
    ml_tree.write("integration/test_modifying.py", MODIFYING)
    result = ml_tree.run()
    result.assert_outcomes(passed=6, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*_ test_zeroes_a_weight _*",
            "modified the shared model BAAI/bge-m3 [[]auto, default[]]:",
            "  - weights changed in place: model.model.model.embeddings.word_embeddings.weight",
            "*Change a private copy instead: request sparse_embedding_model_copy*",
            "*_ test_leaves_training_mode_on _*",
            "modified the shared model backend/taxonomy-classifier [[]auto, default[]]:",
            "  - training mode left on (model.train()): model, model.bert, model.bert.embeddings and * more",
            "*request ml_classification_model_copy*",
            "*_ test_writes_through_data _*",
            "  - weights written (their bytes differ from model.safetensors): model.classifier.weight, model.classifier.bias",
            "*_ test_replaces_a_head _*",
            "modified the shared model backend/taxonomy-classifier*",
            "  - parameters, buffers or submodules added, removed or replaced in: model",
        ]
    )
    reasons = [(r["model"], r["test"].split("::")[1]) for r in ml_tree.loads()["records"]]
    assert reasons == [
        ("BAAI/bge-m3 [auto, default]", "test_zeroes_a_weight"),
        ("BAAI/bge-m3 [auto, default]", "test_zeroes_a_weight"),  # the reload that cleans it
        ("backend/taxonomy-classifier [auto, default]", "test_leaves_training_mode_on"),
        ("backend/taxonomy-classifier [auto, default]", "test_leaves_training_mode_on"),
        ("backend/taxonomy-classifier [auto, default]", "test_writes_through_data"),
        ("backend/taxonomy-classifier [auto, default]", "test_replaces_a_head"),
        ("BAAI/bge-m3 (private copy) [auto, default]", "test_a_private_copy_may_change"),
    ]


def test_the_modification_check_passes_over_a_failure_of_its_own(ml_tree):
    ml_tree.write(
        "integration/test_both.py",
        """
        import pytest

        @pytest.mark.use_real_models
        def test_fails_and_modifies(ml_classification_model_cached):
            ml_classification_model_cached.model.train()
            assert False, "its own failure"
        """,
    )
    result = ml_tree.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*its own failure*", "*- modified the shared model -*", "*modified the shared model backend/taxonomy-classifier*"]
    )


BLOCKER = """
    import pytest
    from app.ml import loading

    @pytest.fixture
    def real_classifier(ml_model_blocker):
        assert ml_model_blocker.is_blocked
        with ml_model_blocker.unblock():
            assert not ml_model_blocker.is_blocked
            loaded = loading.load_classification_model()
        assert ml_model_blocker.is_blocked
        return loaded

    def test_a_fixture_may_load_inside_unblock(real_classifier):
        assert real_classifier.model.config.id2label

    def test_outside_unblock_the_guard_holds():
        loading.load_classification_model()
"""


def test_the_blocker_lets_a_fixture_load_for_real(ml_tree):
    ml_tree.write("unit/test_blocker.py", BLOCKER)
    result = ml_tree.run()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_outside_unblock_the_guard_holds called app.ml.loading.load_classification_model.*"])


def test_the_guard_leaves_one_import_hook_and_none_after_the_run(ml_tree, monkeypatch):
    from ml_fixtures.guard import _PatchAfterImport

    ml_tree.write(
        "unit/test_hook.py",
        """
        import os
        import sys
        from ml_fixtures.guard import _PatchAfterImport

        def hooks():
            return [f for f in sys.meta_path if isinstance(f, _PatchAfterImport)]

        def test_during():
            assert len(hooks()) == int(os.environ["HOOKS_BEFORE"]) + 1

        def test_after_another():
            assert len(hooks()) == int(os.environ["HOOKS_BEFORE"]) + 1
        """,
    )
    before = [f for f in sys.meta_path if isinstance(f, _PatchAfterImport)]  # this run's own, if any
    monkeypatch.setenv("HOOKS_BEFORE", str(len(before)))
    meta_path = sys.meta_path
    ml_tree.run().assert_outcomes(passed=2)
    assert sys.meta_path is meta_path
    assert [f for f in sys.meta_path if isinstance(f, _PatchAfterImport)] == before


MODULE_PATCHES = """
    import pytest
    import torch
    from app.ml import LoadedModel
    from app.services.sparse_embedding_service import SparseEmbeddingService

    SENTINEL = object()

    @pytest.fixture(scope="module", autouse=True)
    def module_patches():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(SparseEmbeddingService, "_load_model", lambda self: LoadedModel(SENTINEL, None, "cpu"))
            mp.setattr(torch, "load", lambda *args, **kwargs: "stubbed")
            yield

    def test_the_modules_own_patches(test_db):
        assert SparseEmbeddingService(test_db).loaded.model is SENTINEL
        assert torch.load("anything") == "stubbed"
"""
AFTER_THE_MODULE = """
    import io

    import pytest
    import torch
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def test_fakes_again(test_db):
        assert type(SparseEmbeddingService(test_db).loaded.model).__name__ == "FakeBGEM3Model"

    def test_torch_load_guarded_again():
        buffer = io.BytesIO()
        torch.save(torch.ones(3), buffer)
        buffer.seek(0)
        torch.load(buffer)
"""


def test_a_modules_own_patches_of_seams_and_loaders_last_for_the_module_and_no_longer(ml_tree):
    """The run's patches go in before any fixture's: a module-scoped fixture's patch of a seam or a loader
    holds for its module, and its undo gives the next module the fakes and the guard back, in any order."""
    import torch

    from app.services.sparse_embedding_service import SparseEmbeddingService

    own_seam, own_load = SparseEmbeddingService.__dict__["_load_model"], torch.load
    ml_tree.write("unit/test_a_module_patches.py", MODULE_PATCHES)
    ml_tree.write("unit/test_b_after.py", AFTER_THE_MODULE)
    result = ml_tree.run("-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_torch_load_guarded_again*called torch.load.*"])
    assert SparseEmbeddingService.__dict__["_load_model"] is own_seam and torch.load is own_load


STRICT = """
    from app.services.sparse_embedding_service import SparseEmbeddingService

    def test_recorded(test_db):
        assert SparseEmbeddingService(test_db).generate_embedding("Knead the dough and bake the bread")

    def test_unrecorded(test_db):
        SparseEmbeddingService(test_db).generate_embedding("zebra crossing")
"""


def test_strict_replay_fails_an_unrecorded_text_naming_the_cassette_and_the_command(ml_tree):
    directory = ml_tree.root / "cassettes"
    ml_tree.write(
        "integration/test_record.py",
        """
        import pytest
        from app.services.sparse_embedding_service import SparseEmbeddingService

        @pytest.mark.use_real_models
        def test_record(test_db):
            SparseEmbeddingService(test_db).generate_embedding("Knead the dough and bake the bread")
        """,
    )
    ml_tree.write("unit/test_strict.py", STRICT)
    options = (f"--ml-cassette-dir={directory}",)
    ml_tree.run("integration", "--ml-record=once", *options).assert_outcomes(passed=1)
    ml_tree.run("unit", *options).assert_outcomes(passed=2)  # default: fallback to made-up output

    result = ml_tree.run("unit", "--ml-replay=strict", *options)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*CassetteMissError: --ml-replay=strict: no current cassette holds a recorded output of BAAI/bge-m3"
            " for 'zebra crossing'*",
            f"*Cassette of this test: {directory}/unit/test_strict.json (not recorded yet)",
            "*pytest unit/test_strict.py::test_unrecorded --ml-record=once",
        ]
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ml-record=sometimes"], "--ml-record must be one of none, once, rewrite, verify, accept, prune; got 'sometimes'"),
        (["--ml-replay=lenient"], "--ml-replay must be one of fallback, strict, none; got 'lenient'"),
        (["--ml-model-scope=class"], "--ml-model-scope must be one of session, module, function; got 'class'"),
    ],
)
def test_modes_are_enums_and_a_bad_value_lists_the_valid_ones(ml_tree, args, message):
    result = ml_tree.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_a_bad_policy_lists_the_valid_ones(ml_tree):
    ml_tree.write(
        "unit/conftest.py",
        """
        import pytest

        @pytest.fixture(scope="session")
        def ml_model_policy():
            return "strict"
        """,
    )
    ml_tree.write("unit/test_any.py", "def test_any():\n    pass\n")
    result = ml_tree.run()
    result.stdout.fnmatch_lines(["*ml_model_policy must be one of unit, integration; got 'strict'*"])


def test_the_marker_is_registered_by_the_plugin(ml_tree):
    assert "markers =" not in (ml_tree.root / "pytest.ini").read_text()
    ml_tree.run("--markers").stdout.fnmatch_lines(["@pytest.mark.use_real_models: run this test on real models*"])
