"""Which cassette entries each test used, the entries none used, prune, and merging the shards of a split run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_fixtures import unused
from ml_fixtures.cassettes import dump
from ml_fixtures.usage import CassetteUsage, EntryRef, Selection, Use
from selftests.test_cassette_verification import MODELS, QUERIES, RECORDING, TEXTS, record_tree

SPARSE, CLASSIFIER, RERANKER = "BAAI/bge-m3", "backend/taxonomy-classifier", "BAAI/bge-reranker-v2-m3"
UNIT = "unit/test_replays.py::test_replays"
#: An entry no test makes: recorded once by a test that is gone.
LEFTOVER = "A text that no test asks for any more"


@pytest.fixture
def tree(ml_tree) -> Path:
    """A recorded tree whose cassette of test_models also holds an entry that no test uses."""
    directory = record_tree(ml_tree)
    cassette = json.loads((directory / MODELS).read_text())
    cassette["models"][SPARSE]["calls"][LEFTOVER] = {"text": 0.2}
    (directory / MODELS).write_text(dump(cassette))
    return directory


def run(ml_tree, directory: Path, *args: str, **env: str) -> pytest.RunResult:
    return ml_tree.run(f"--ml-cassette-dir={directory}", *args, **env)


def test_each_test_notes_the_entries_it_replayed_or_recorded(ml_tree, tree):
    path = ml_tree.root / "usage.json"
    run(ml_tree, tree, f"--ml-cassette-usage={path}").assert_outcomes(passed=3)
    data = json.loads(path.read_text())
    tests = {test: {use: {EntryRef(*ref) for ref in refs} for use, refs in uses.items()} for test, uses in data["tests"].items()}
    assert tests[UNIT] == {
        "replayed": {EntryRef(MODELS, SPARSE, text) for text in TEXTS[:2]}
        | {EntryRef(MODELS, CLASSIFIER, TEXTS[0])}
        | {EntryRef(MODELS, RERANKER, json.dumps([QUERIES[0], text])) for text in TEXTS}
    }
    held = json.loads((tree / MODELS).read_text())["models"]
    recorded = {EntryRef(MODELS, model, key) for model, entry in held.items() for key in entry["calls"] if key != LEFTOVER}
    assert tests["integration/test_models.py::test_models"] == {"recorded": recorded}, "a real-model test's own entries"
    assert tests["integration/test_other.py::test_other"] == {
        "recorded": {EntryRef("integration/test_other.json", SPARSE, "Knead the dough and bake the bread")}
    }
    assert data["cassette_dir"] == "cassettes" and data["selection"]["narrowed"] == []
    assert set(data["selection"]["outcomes"]) == set(tests) and set(data["selection"]["outcomes"].values()) == {"passed"}


@pytest.mark.slow
def test_a_recording_run_notes_what_each_test_records(ml_tree):
    directory, path = ml_tree.root / "cassettes", ml_tree.root / "usage.json"
    ml_tree.write("integration/test_models.py", RECORDING)
    ml_tree.run("--ml-record=once", f"--ml-cassette-dir={directory}", f"--ml-cassette-usage={path}").assert_outcomes(passed=1)
    recorded = json.loads((directory / MODELS).read_text())["models"]
    assert json.loads(path.read_text())["tests"]["integration/test_models.py::test_models"] == {
        "recorded": sorted([MODELS, model, key] for model, entry in recorded.items() for key in entry["calls"])
    }


def test_a_fake_kept_by_a_module_scoped_fixture_answers_for_the_test_being_run(ml_tree, tree):
    ml_tree.write(
        "unit/test_module_scoped.py",
        f"""
        import pytest
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session
        from app.services.sparse_embedding_service import SparseEmbeddingService

        @pytest.fixture(scope="module")
        def service():
            return SparseEmbeddingService(Session(create_engine("sqlite://")))

        def test_first(service):
            assert service.generate_embedding({TEXTS[0]!r})

        def test_second(service):
            assert service.generate_embedding({TEXTS[1]!r})
        """,
    )
    path = ml_tree.root / "usage.json"
    run(ml_tree, tree, "unit/test_module_scoped.py", f"--ml-cassette-usage={path}").assert_outcomes(passed=2)
    tests = json.loads(path.read_text())["tests"]
    for name, text in (("test_first", TEXTS[0]), ("test_second", TEXTS[1])):
        assert tests[f"unit/test_module_scoped.py::{name}"] == {"replayed": [[MODELS, SPARSE, text]]}


def test_a_run_of_every_test_lists_the_entries_no_test_used(ml_tree, tree):
    result = run(ml_tree, tree)
    result.stdout.fnmatch_lines(["*ML cassettes*", "1 cassette entries no test used:", f"  {MODELS} ({SPARSE}): '{LEFTOVER}'"])
    assert "cassette entries no test used" not in run(ml_tree, tree, "unit").stdout.str(), "a part of the suite cannot tell"


def test_prune_under_k_or_a_narrower_path_removes_nothing(ml_tree, tree):
    before = {path: path.read_bytes() for path in tree.rglob("*.json")}
    for narrowed in (("-k", "replays"), ("unit",), ("-m", "not slow")):
        result = run(ml_tree, tree, "--ml-record=prune", *narrowed)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--ml-record=prune removes nothing: *", "*needs a run of the whole suite*"])
    assert {path: path.read_bytes() for path in tree.rglob("*.json")} == before


@pytest.mark.slow
def test_prune_after_a_failed_test_removes_nothing(ml_tree, tree):
    before = (tree / MODELS).read_bytes()
    ml_tree.write("unit/test_failing.py", "def test_failing():\n    assert False\n")
    result = run(ml_tree, tree, "--ml-record=prune")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*--ml-record=prune removes nothing: 1 tests did not pass, e.g. unit/test_failing.py*"])
    assert (tree / MODELS).read_bytes() == before


@pytest.mark.slow
def test_prune_in_a_run_of_every_test_removes_only_the_unused_entry(ml_tree, tree):
    cassette = json.loads((tree / MODELS).read_text())
    del cassette["models"][SPARSE]["calls"][LEFTOVER]
    other = (tree / "integration/test_other.json").read_bytes()
    result = run(ml_tree, tree, "--ml-record=prune")
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"  {MODELS} ({SPARSE}): '{LEFTOVER}'", f"pruned: {MODELS}"])
    assert (tree / MODELS).read_text() == dump(cassette)
    assert (tree / "integration/test_other.json").read_bytes() == other
    run(ml_tree, tree, "--ml-record=prune").stdout.fnmatch_lines(["pruned nothing: every cassette entry was used"])


@pytest.mark.slow
def test_the_shards_of_a_split_run_merge_and_prune_together(ml_tree, tree, capsys):
    shards = [ml_tree.root / f"usage-{group}.json" for group in (1, 2)]
    for group, path in enumerate(shards, 1):
        result = run(ml_tree, tree, "--splits=2", f"--group={group}", f"--ml-cassette-usage={path}")
        assert result.ret == 0 and "cassette entries no test used" not in result.stdout.str()
    before = (tree / MODELS).read_bytes()

    assert unused.main([str(shards[0]), "--prune"]) == 1, "one shard cannot prune"
    out, err = capsys.readouterr()
    assert "did not run every test" in out and "pytest-split group(s) 1 of 2" in err
    assert (tree / MODELS).read_bytes() == before

    merged = ml_tree.root / "merged.json"
    assert unused.main([*map(str, shards), f"--out={merged}", "--prune"]) == 0
    out, _ = capsys.readouterr()
    assert f"  {MODELS} ({SPARSE}): '{LEFTOVER}'" in out and f"pruned: {MODELS}" in out
    assert LEFTOVER not in (tree / MODELS).read_text()
    whole = ml_tree.root / "whole.json"
    run(ml_tree, tree, f"--ml-cassette-usage={whole}").assert_outcomes(passed=3)
    assert json.loads(merged.read_text())["tests"] == json.loads(whole.read_text())["tests"], "the shards merge to the whole"


def test_usage_merges_as_xdist_workers_send_it():
    usage, worker = CassetteUsage(), CassetteUsage()
    ref, other = EntryRef("a.json", "m", "text"), EntryRef("b.json", "m", '["q", "t"]')
    usage.note("t1", ref, Use.REPLAYED)
    worker.note("t1", other, Use.RECORDED)
    worker.note("t2", ref, Use.REPLAYED)
    usage.merge(json.loads(json.dumps(worker.to_dict())))
    assert usage.of("t1").replayed == {ref} and usage.of("t1").recorded == {other}
    assert usage.of("t1").entries == {ref, other} and usage.of("t2").entries == {ref} and usage.of("t3").entries == set()
    assert usage.tests() == ["t1", "t2"] and usage.used() == {ref, other} and usage.cassettes() == {"a.json", "b.json"}


def test_a_selection_speaks_for_the_suite_only_when_every_test_ran_and_passed():
    shard = Selection(collected={"a", "b"}, outcomes={"a": "passed"}, groups=[(1, 2)])
    assert not shard.selected_all and shard.reasons() == ["1 of 2 tests did not run (pytest-split group(s) 1 of 2), e.g. b"]
    shard.merge(Selection(collected={"a", "b"}, outcomes={"b": "skipped"}, groups=[(2, 2)]).to_dict())
    assert shard.selected_all and not shard.complete
    assert shard.reasons() == ["1 tests did not pass, e.g. b (skipped)"]
    assert not Selection(collected={"a"}, outcomes={"a": "passed"}, narrowed=["-k 'x'"]).selected_all


@pytest.mark.slow
def test_xdist_workers_send_their_usage_to_the_controller(ml_tree, tree):
    """Two workers (real processes): the controller merges their usage into the single process's."""
    single, parallel = ml_tree.root / "single.json", ml_tree.root / "parallel.json"
    run(ml_tree, tree, f"--ml-cassette-usage={single}").assert_outcomes(passed=3)
    run(ml_tree, tree, "-n", "2", f"--ml-cassette-usage={parallel}").assert_outcomes(passed=3)
    one, two = (json.loads(path.read_text()) for path in (single, parallel))
    assert two["tests"] == one["tests"] and two["selection"]["collected"] == one["selection"]["collected"]
    assert set(two["selection"]["outcomes"].values()) == {"passed"}
