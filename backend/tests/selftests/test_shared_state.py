"""Everything a cached fixture hands out is checked: single weight elements, hooks, tokenizer,
config, the model object's settings; a change fails its test and the next test gets the model as
loaded, in the same objects. Honest use and private copies are never flagged."""

import os

import pytest

from ml_fixtures import mutation, pages

HELD_STATE = """
    import pytest
    import torch
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models
    AT_LOAD = {}


    @pytest.fixture(scope="module")
    def held(ml_classification_model_cached, sparse_embedding_model_cached):
        # What a module-scoped fixture keeps: the objects, not copies of them.
        model, tokenizer, _ = ml_classification_model_cached
        return model, tokenizer, model.config, sparse_embedding_model_cached.model


    def query(wrapper):
        return wrapper.model.model.encoder.layer[0].attention.self.query.weight


    def state(held):
        model, tokenizer, config, wrapper = held
        return {
            "element": float(query(wrapper).detach()[3, 7]),
            "position_id": int(model.bert.embeddings.position_ids[0, 5]),
            "hooks": len(model.bert.encoder.layer[1]._forward_hooks),
            "global_hooks": len(torch.nn.modules.module._global_forward_hooks),
            "padding_side": tokenizer.padding_side,
            "model_max_length": tokenizer.model_max_length,
            "tokens": len(tokenizer),
            "truncation": tokenizer.backend_tokenizer.truncation,
            "output_hidden_states": config.output_hidden_states,
            "passage_max_length": wrapper.passage_max_length,
        }


    def test_at_load(held):
        AT_LOAD.update(state(held))


    @pytest.fixture
    def as_loaded(held, ml_classification_model_cached, sparse_embedding_model_cached, test_db):
        model, tokenizer, config, wrapper = held
        classifier, sparse = ml_classification_model_cached, sparse_embedding_model_cached
        assert (model, tokenizer, wrapper) == (classifier.model, classifier.tokenizer, sparse.model)
        assert model.config is config and model.bert.config is config and wrapper.model.tokenizer is wrapper.tokenizer
        assert state(held) == AT_LOAD
        assert MLClassificationService(test_db).predict("The striker scored a goal").top.label == "sports"
        assert SparseEmbeddingService(test_db).generate_embedding("python programming")


    def test_writes_one_element_through_data(sparse_embedding_model_cached):
        query(sparse_embedding_model_cached.model).data[3, 7] += 5

    def test_after_the_element(as_loaded):
        pass

    def test_writes_a_buffer_element(ml_classification_model_cached):
        ml_classification_model_cached.model.bert.embeddings.position_ids.data[0, 5] = 0

    def test_after_the_buffer(as_loaded):
        pass

    def test_leaves_a_forward_hook(ml_classification_model_cached):
        layer = ml_classification_model_cached.model.bert.encoder.layer[1]
        layer.register_forward_hook(lambda module, args, output: (torch.zeros_like(output[0]),))

    def test_after_the_hook(as_loaded):
        pass

    def test_leaves_a_global_hook(ml_classification_model_cached):
        torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)

    def test_after_the_global_hook(as_loaded):
        pass

    def test_sets_padding_side(ml_classification_model_cached):
        ml_classification_model_cached.tokenizer.padding_side = "left"

    def test_after_padding_side(as_loaded):
        pass

    def test_sets_model_max_length(ml_classification_model_cached):
        ml_classification_model_cached.tokenizer.model_max_length = 4

    def test_after_model_max_length(as_loaded):
        pass

    def test_adds_a_token(ml_classification_model_cached):
        ml_classification_model_cached.tokenizer.add_tokens(["zqxjv"])

    def test_after_the_token(as_loaded):
        pass

    def test_enables_backend_truncation(ml_classification_model_cached):
        ml_classification_model_cached.tokenizer("a first call")
        ml_classification_model_cached.tokenizer.backend_tokenizer.enable_truncation(max_length=3)

    def test_after_backend_truncation(as_loaded):
        pass

    def test_flips_a_config_flag(ml_classification_model_cached):
        ml_classification_model_cached.model.config.output_hidden_states = True

    def test_after_the_config(as_loaded):
        pass

    def test_changes_a_wrapper_setting(sparse_embedding_model_cached):
        sparse_embedding_model_cached.model.passage_max_length = 8

    def test_after_the_setting(as_loaded):
        pass
"""


def test_each_kind_of_change_fails_its_test_and_the_next_gets_the_model_as_loaded(ml_tree):
    ml_tree.write("integration/test_held_state.py", HELD_STATE)
    result = ml_tree.run()
    result.assert_outcomes(passed=11, failed=10)
    changes = {
        "test_writes_one_element_through_data": "weights written (their bytes differ from model.safetensors): "
        "model.model.model.encoder.layer.0.attention.self.query.weight",
        "test_writes_a_buffer_element": "weights changed (checksum of their bytes): model.bert.embeddings.position_ids",
        "test_leaves_a_forward_hook": "hooks added or removed (register_*_hook, handle.remove()): "
        "model.bert.encoder.layer.1 (forward hook)",
        "test_leaves_a_global_hook": "torch global module hooks added or removed (register_module_*_hook): forward hooks",
        "test_sets_padding_side": "attributes changed: tokenizer.padding_side ('right' -> 'left')",
        "test_sets_model_max_length": "attributes changed: tokenizer.model_max_length (512 -> 4)",
        "test_adds_a_token": "tokenizer backend changed (add_tokens, backend_tokenizer.*): vocabulary size, added tokens",
        "test_enables_backend_truncation": "tokenizer backend truncation or padding set outside a tokenizer call "
        "(backend_tokenizer.enable_*/no_*): truncation",
        "test_flips_a_config_flag": "attributes changed: model.config.output_hidden_states (False -> True)",
        "test_changes_a_wrapper_setting": "attributes changed: model.passage_max_length (512 -> 8)",
    }
    for test, change in changes.items():
        result.stdout.fnmatch_lines([f"*_ {test} _*", "modified the shared model *:", f"  - {change}"])
    failed = [line.split("::")[1].split(" ")[0] for line in result.outlines if line.startswith("FAILED ")]
    assert failed == list(changes)


HONEST = """
    import pytest
    import torch
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models


    def test_outputs_and_arguments_asked_per_call(ml_classification_model_cached, sparse_embedding_model_cached):
        model, tokenizer, _ = ml_classification_model_cached
        inputs = tokenizer(["one two three four five"], truncation=True, max_length=4, padding="max_length", return_tensors="pt")
        with torch.no_grad():
            output = model(**inputs, output_hidden_states=True, output_attentions=True)
        assert len(output.hidden_states) == model.config.num_hidden_layers + 1
        assert tokenizer.tokenize("hello world") and tokenizer.decode(inputs["input_ids"][0])
        encoded = sparse_embedding_model_cached.model.encode(
            ["python"], return_dense=True, return_sparse=True, return_colbert_vecs=True, max_length=16
        )
        assert encoded["lexical_weights"]
        model.eval()
        assert model.state_dict()

    def test_changes_undone_before_the_end(ml_classification_model_cached):
        model, tokenizer, _ = ml_classification_model_cached
        handle = model.bert.register_forward_hook(lambda module, args, output: None)
        handle.remove()
        tokenizer.padding_side = "left"
        tokenizer.padding_side = "right"
        model.train()
        model.eval()

    @pytest.fixture
    def capture(ml_classification_model_cached, monkeypatch):
        model, tokenizer, _ = ml_classification_model_cached
        monkeypatch.setattr(tokenizer, "padding_side", "left")
        monkeypatch.setattr(model.config, "output_hidden_states", True)
        handle = model.bert.encoder.layer[0].register_forward_hook(lambda module, args, output: None)
        yield
        handle.remove()

    def test_changes_that_its_fixtures_undo(capture, ml_classification_model_cached):
        assert ml_classification_model_cached.tokenizer.padding_side == "left"

    def test_a_private_copy_may_change_in_every_way(ml_classification_model_copy, ml_classification_model_cached):
        model, tokenizer, _ = ml_classification_model_copy
        model.classifier.weight.data[0, 0] += 5
        model.bert.register_forward_hook(lambda module, args, output: None)
        model.config.output_hidden_states = True
        tokenizer.padding_side = "left"
        tokenizer.add_tokens(["zqxjv"])
        tokenizer.backend_tokenizer.enable_truncation(max_length=3)

    def test_services(test_db):
        assert MLClassificationService(test_db).predict("The striker scored a goal").top.label == "sports"
        assert SparseEmbeddingService(test_db).generate_embeddings(["bread", "python"])
"""


def test_honest_use_and_private_copies_are_never_flagged(ml_tree, monkeypatch):
    ml_tree.write("integration/test_honest.py", HONEST)
    ml_tree.run().assert_outcomes(passed=5)
    monkeypatch.setattr(mutation, "PER_TEST_PAGES", 0)  # the deferred checks at the end of the module
    ml_tree.run().assert_outcomes(passed=5)


DEFERRED = """
    import pytest

    pytestmark = pytest.mark.use_real_models

    def query(loaded):
        return loaded.model.model.model.encoder.layer[0].attention.self.query.weight

    def test_first(sparse_embedding_model_cached):
        pass

    def test_zeroes_a_head(sparse_embedding_model_cached):
        sparse_embedding_model_cached.model.model.sparse_linear.weight.data.zero_()  # its first element tells

    def test_writes(sparse_embedding_model_cached):
        query(sparse_embedding_model_cached).data[3, 7] = 0.5

    def test_last(sparse_embedding_model_cached):
        pass
"""


def test_a_write_found_at_the_end_of_the_module_names_the_tests_since_the_last_clean_check(ml_tree, monkeypatch):
    monkeypatch.setattr(mutation, "PER_TEST_PAGES", 0)  # as for a model too large to scan after each test
    ml_tree.write("integration/test_a_deferred.py", DEFERRED)
    ml_tree.write(
        "integration/test_b_next.py",
        """
        import pytest

        @pytest.mark.use_real_models
        def test_next_module(sparse_embedding_model_cached):
            query = sparse_embedding_model_cached.model.model.model.encoder.layer[0].attention.self.query
            assert float(query.weight[3, 7]) != 0.5
        """,
    )
    result = ml_tree.run()
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_zeroes_a_head _*",
            "  - weights changed through .data (no version bump): model.model.sparse_linear.weight",
            "*_ test_last _*",
            "modified the shared model BAAI/bge-m3 *:",
            (
                "  - weights written (their bytes differ from model.safetensors): "
                "model.model.model.encoder.layer.0.attention.self.query.weight"
            ),
            (
                "  - found by the deferred check after integration/test_a_deferred.py::test_last; one of these tests did it: "
                "integration/test_a_deferred.py::test_writes, integration/test_a_deferred.py::test_last"
            ),
        ]
    )


def test_a_reload_that_fails_is_an_error_naming_the_model_not_an_internal_error(ml_tree, tmp_path):
    from app.ml import loading

    built = loading.resolve_model_path(loading.SPARSE_EMBEDDING)
    for file in built.iterdir():
        (tmp_path / file.name).symlink_to(file)
    ml_tree.write(
        "integration/test_reload.py",
        f"""
        import os
        import pytest

        pytestmark = pytest.mark.use_real_models

        def test_changes_and_breaks_the_files(sparse_embedding_model_cached):
            sparse_embedding_model_cached.model.model.train()
            os.remove({str(tmp_path / "config.json")!r})

        def test_next():
            pass
        """,
    )
    result = ml_tree.run(SPARSE_EMBEDDING_MODEL_PATH=str(tmp_path))
    result.assert_outcomes(failed=1, passed=1, errors=1)  # the change fails the test; the failed restore is an error
    assert "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_changes_and_breaks_the_files*",
            "*ModelRestoreError: a test changed the shared model and it could not be loaded again to restore it:",
            "*BAAI/bge-m3 [[]auto, default[]]: model 'BAAI/bge-m3' is unavailable:*",
        ]
    )


@pytest.fixture(scope="module")
def classifier():
    from app.ml import loading

    return loading.load_classification_model(device="cpu")


def test_pagemap_scan_and_pagemap_entries_agree(classifier):
    """The ioctl and the fallback that reads pagemap entries find the same written pages."""
    import torch

    fresh = mutation.watch(classifier)  # settles the model before the first inference
    with torch.no_grad():
        classifier.model(**classifier.tokenizer(["a sentence to run"], return_tensors="pt"))
    ranges = fresh.mapped.ranges
    assert pages.written_pages(ranges, pages.Method.SCAN) == pages.written_pages(ranges, pages.Method.READ) == []
    snapshots = [mutation.ModelSnapshot(classifier, method) for method in pages.Method]
    embeddings, bias = classifier.model.bert.embeddings.word_embeddings.weight, classifier.model.classifier.bias
    elements = [(0, 0), (1000, 17), (30521, 383)]
    loaded = [float(embeddings.detach()[element]) for element in elements]
    for element in elements:
        embeddings.data[element] += 1
    bias.data[-1] += 1
    found = pages.written_pages(ranges, pages.Method.SCAN)
    assert found == pages.written_pages(ranges, pages.Method.READ)
    assert sum(end - start for start, end in found) == 4 * pages.PAGE
    names = fresh.tensor_names
    for snapshot in snapshots:
        written = [names.index("model.bert.embeddings.word_embeddings.weight"), names.index("model.classifier.bias")]
        assert snapshot.mapped.written() == (written, [])
    for element, value in zip(elements, loaded):
        embeddings.data[element] = value  # the bytes of the file again, on pages that stay copies
    for snapshot in snapshots:
        changed, rewritten = snapshot.mapped.written()  # rewritten: the tensors that share those pages
        assert changed == [names.index("model.classifier.bias")]
        assert names.index("model.bert.embeddings.word_embeddings.weight") in rewritten
    for snapshot in [fresh, *snapshots]:
        snapshot.close()


def test_under_int8_the_packed_weights_and_the_mapped_rest_are_checked():
    import torch

    from app.ml import loading

    loaded = loading.load_classification_model(device="cpu", dtype="int8")
    snapshot = mutation.ModelSnapshot(loaded)
    mapped = {snapshot.tensor_names[i] for _, _, i in snapshot.mapped.spans}
    assert "model.bert.embeddings.word_embeddings.weight" in mapped  # quantized in place: the rest stays mapped
    assert {snapshot.tensor_names[i] for i in snapshot.checksums.indices} == {
        "model.bert.embeddings.position_ids",
        "model.bert.embeddings.token_type_ids",
    }
    layer = loaded.model.bert.encoder.layer[0].attention.self.query
    _, bias = layer._weight_bias()
    layer.set_weight_bias(torch.quantize_per_tensor(torch.zeros(384, 384), 0.1, 0, torch.qint8), bias)
    loaded.model.bert.embeddings.word_embeddings.weight.data[5, 5] = 3.0
    assert snapshot.changes() == [
        "weights written (their bytes differ from model.safetensors): model.bert.embeddings.word_embeddings.weight",
        "attributes changed: model.bert.encoder.layer.0.attention.self.query._packed_params._packed_params",
    ]
    snapshot.close()


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64", "int8"])
def test_the_checksum_sees_one_element_and_a_swap_and_numpy_and_torch_agree(dtype):
    """The sums by numpy over CPU memory and by torch (what a GPU runs) are the same numbers."""
    import torch

    tensor = (torch.randn(3000) * 50).to(getattr(torch, dtype))

    def both():
        on_cpu, by_torch = pages.cpu_checksum(pages._elements(tensor)), pages.device_checksum(tensor)
        assert on_cpu == by_torch
        return on_cpu

    before = both()
    value = tensor[1234].item()
    tensor[1234] += 1
    assert both() != before
    tensor[1234] = value
    assert both() == before
    tensor[[7, 8]] = tensor[[8, 7]]
    assert both() != before or tensor[7] == tensor[8]


def test_a_missing_pagemap_ioctl_falls_back_to_pagemap_entries(monkeypatch):
    import errno

    def no_ioctl(fd, start, end):
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    assert pages.best_method() is pages.Method.SCAN
    monkeypatch.setattr(pages, "_scan", no_ioctl)
    assert pages.best_method() is pages.Method.READ


def test_a_model_evicted_after_a_change_is_reported_with_it():
    """The pool checks a model before it evicts it; the change is reported after the test."""
    from app.ml import LoadedModel
    from ml_fixtures.pool import ModelKey, ModelPool

    class Model:
        def __init__(self):
            self.max_length = 512

    found = []
    pool = ModelPool(100, size_of=lambda model: 60, on_changed=lambda key, changes: found.append((key, changes)))
    first = pool.acquire(ModelKey("a"), lambda: LoadedModel(Model(), None, "cpu"))
    first.model.max_length = 8
    pool.acquire(ModelKey("b"), lambda: LoadedModel(Model(), None, "cpu"))  # evicts "a"
    assert found == [(ModelKey("a"), ["attributes changed: model.max_length (512 -> 8)"])]
    found.clear()
    pool.after_test("test", module_ends=True, release=False)
    assert found == [] and pool.keys() == [ModelKey("b")]


def test_without_pagemap_every_tensor_is_checksummed(classifier, monkeypatch):
    """Where there is no /proc/self/pagemap (not Linux), the checksums cover every weight."""
    monkeypatch.setattr(pages, "PAGEMAP", "/nonexistent/pagemap")
    assert pages.best_method() is None
    snapshot = mutation.ModelSnapshot(classifier)
    covered = snapshot.checksums.indices + snapshot.deferred_checksums.indices
    assert not snapshot.mapped.spans and sorted(covered) == list(range(len(snapshot.tensors)))
    bias = classifier.model.classifier.bias
    value = float(bias.detach()[2])
    bias.data[2] = value + 1
    assert snapshot.changes() == ["weights changed (checksum of their bytes): model.classifier.bias"]
    bias.data[2] = value
    assert snapshot.changes() == []
    snapshot.close()
