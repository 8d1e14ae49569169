"""--ml-record=verify and accept on real models: no drift from the models that recorded, numeric drift from a
head with a little noise, decision drift from a changed head; accept rewrites only what drifted."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import pytest

from ml_fixtures.cassettes import dump

TEXTS = [
    "Doctors warned that antibiotic resistance is a growing medical threat",
    "Vitamin D deficiency is common in people who get little sunlight",
    "The insurance company raised premiums after a year of heavy claims",
    "Boil the pasta in salted water",
    "Our luggage was lost on the connecting flight to Rome",
    "The goalkeeper saved a penalty",
]
QUERIES = ["a growing medical threat", "a flight to Rome"]
RECORDING = f"""
    import pytest
    from app.services.ml_classification_service import MLClassificationService
    from app.services.rerank_service import RerankService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    pytestmark = pytest.mark.use_real_models
    TEXTS = {TEXTS!r}

    def test_models(test_db):
        assert all(SparseEmbeddingService(test_db).generate_embeddings(TEXTS))
        assert MLClassificationService(test_db).predict_batch(TEXTS)
        for query in {QUERIES!r}:
            assert RerankService(test_db).rerank(query, TEXTS)
"""
OTHER = """
    import pytest
    from app.services.sparse_embedding_service import SparseEmbeddingService

    @pytest.mark.use_real_models
    def test_other(test_db):
        assert SparseEmbeddingService(test_db).generate_embedding("Knead the dough and bake the bread")
"""
REPLAYING = f"""
    from app.services.ml_classification_service import MLClassificationService
    from app.services.rerank_service import RerankService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    TEXTS = {TEXTS!r}

    def test_replays(test_db):
        assert SparseEmbeddingService(test_db).generate_embeddings(TEXTS[:2])
        assert MLClassificationService(test_db).predict(TEXTS[0]).top.label == "health"
        assert RerankService(test_db).rerank({QUERIES[0]!r}, TEXTS)[0][0] == 0
"""
MODELS = "integration/test_models.json"
CLASSIFIER = "backend/taxonomy-classifier"
#: The label whose bias gets a small shift: its probability moves beyond tolerance where it is large.
SHIFTED, SHIFT = "health", 0.05


def copy_with(source: Path, target: Path, change, keep_recipe: bool = True) -> Path:
    """A copy of a model directory (links to its files) whose weights ``change(tensors)`` altered."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors" and (keep_recipe or file.name != "recipe.json"):
            (target / file.name).symlink_to(file)
    tensors = load_file(source / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def changed_models(tmp_path_factory) -> dict[str, Path]:
    """Copies of the embedded classifier and reranker with a changed head (the recipe kept: the same fingerprint)."""
    from app.ml import resolve_model_path
    from app.ml.resolver import CLASSIFICATION, RERANK

    classifier, reranker = resolve_model_path(CLASSIFICATION), resolve_model_path(RERANK)
    labels = json.loads((classifier / "config.json").read_text())["label2id"]
    root = tmp_path_factory.mktemp("changed-models")

    def shift(tensors):
        tensors["classifier.bias"][labels[SHIFTED]] += SHIFT

    def swap(tensors):
        order = list(range(len(labels)))
        order[labels["cooking"]], order[labels["travel"]] = labels["travel"], labels["cooking"]
        tensors["classifier.weight"] = tensors["classifier.weight"][order].contiguous()
        tensors["classifier.bias"] = tensors["classifier.bias"][order].contiguous()

    def negate(tensors):
        tensors["classifier.weight"] = -tensors["classifier.weight"]
        tensors["classifier.bias"] = -tensors["classifier.bias"]

    shifted = copy_with(classifier, root / "classifier-shifted", shift)
    stale = root / "classifier-shifted-stale"  # the same weights without recipe.json: another fingerprint
    stale.mkdir()
    for file in shifted.iterdir():
        if file.name != "recipe.json":
            (stale / file.name).symlink_to(file.resolve())
    return {
        "shifted": shifted,
        "stale": stale,
        "swapped": copy_with(classifier, root / "classifier-swapped", swap),
        "negated": copy_with(reranker, root / "reranker-negated", negate),
    }


#: The cassettes of this process's first recording, by path: the embedded models answer the same each
#: time, so later trees get these bytes instead of a recording run of their own.
_first_recording: dict[str, bytes] = {}


def record_tree(ml_tree) -> Path:
    """Write the tree's tests and record their cassettes from the embedded models: the cassettes' directory."""
    directory = ml_tree.root / "cassettes"
    ml_tree.write("integration/test_models.py", RECORDING)
    ml_tree.write("integration/test_other.py", OTHER)
    ml_tree.write("unit/test_replays.py", REPLAYING)
    if not _first_recording:
        ml_tree.run("integration", "--ml-record=once", f"--ml-cassette-dir={directory}").assert_outcomes(passed=2)
        _first_recording.update(snapshot(directory))
        return directory
    for name, data in _first_recording.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def recorded(ml_tree) -> Path:
    """A tree whose integration tests recorded their cassettes from the embedded models."""
    return record_tree(ml_tree)


def verify(ml_tree, directory: Path, *args: str, mode: str = "verify", **env: str):
    report = ml_tree.root / "drift.json"
    result = ml_tree.run(f"--ml-record={mode}", f"--ml-cassette-dir={directory}", f"--ml-drift-report={report}", *args, **env)
    return result, json.loads(report.read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*.json"))}


def test_verify_against_the_models_that_recorded_finds_no_drift_twice(ml_tree, recorded):
    before = snapshot(recorded)
    for _ in range(2):
        result, report = verify(ml_tree, recorded)
        assert result.ret == 0
        assert sorted(report["models"]) == ["BAAI/bge-m3", "BAAI/bge-reranker-v2-m3", CLASSIFIER]
        for name, model in report["models"].items():
            assert model["checked"] > 0 and model["drifted"] == model["decisions"] == 0, name
            assert model["environment"]["recorded"][MODELS] == model["environment"]["now"]
        assert report["models"][CLASSIFIER]["checked"] == len(TEXTS)
        assert report["models"]["BAAI/bge-reranker-v2-m3"]["checked"] == len(QUERIES) * len(TEXTS)
        result.stdout.fnmatch_lines(["*--ml-record=verify: 2 cassettes, * entries recomputed and compared in *"])
    assert snapshot(recorded) == before, "verify writes nothing"


def test_verify_checks_the_cassettes_that_the_selected_tests_use(ml_tree, recorded):
    result, report = verify(ml_tree, recorded, "unit")
    assert result.ret == 0 and report["cassettes"] == [MODELS], "the unit test replays from test_models.json only"
    assert report["models"]["BAAI/bge-m3"]["checked"] == len(TEXTS), "every entry of a used cassette"


def expected_shift_drift(recorded_calls: dict, tolerance: float) -> set[str]:
    """The texts whose probabilities the bias shift moves beyond tolerance, from the recorded logits alone."""

    def softmax(row):
        exps = [math.exp(x - max(row)) for x in row]
        return [x / sum(exps) for x in exps]

    drifted = set()
    for text, logits in recorded_calls.items():
        labels = sorted(logits)
        before = softmax([logits[label] for label in labels])
        after = softmax([logits[label] + (SHIFT if label == SHIFTED else 0.0) for label in labels])
        change = max(abs(a - b) for a, b in zip(before, after))
        assert abs(change - tolerance) > tolerance / 4, f"{text!r} is too near the tolerance to tell"
        if change > tolerance:
            drifted.add(text)
    return drifted


def test_a_little_noise_in_a_head_is_numeric_drift_in_that_models_entries_only(ml_tree, recorded, changed_models):
    calls = json.loads((recorded / MODELS).read_text())["models"][CLASSIFIER]["calls"]
    result, report = verify(ml_tree, recorded, CLASSIFICATION_MODEL_PATH=str(changed_models["shifted"]))
    assert result.ret == 1
    classifier = report["models"][CLASSIFIER]
    expected = expected_shift_drift(calls, classifier["declared"]["atol"])
    assert 0 < len(expected) < len(TEXTS)
    assert {entry["key"] for entry in classifier["drifted_entries"]} == expected
    assert classifier["decisions"] == 0 and classifier["numeric"] == len(expected)
    assert [name for name, model in report["models"].items() if model["drifted"]] == [CLASSIFIER]
    result.stdout.fnmatch_lines([f"*DRIFT beyond tolerance: {CLASSIFIER}: {len(expected)} entries, 0 of them decisions*"])


def test_a_changed_head_is_decision_drift(ml_tree, recorded, changed_models):
    calls = json.loads((recorded / MODELS).read_text())["models"][CLASSIFIER]["calls"]
    changed = {"CLASSIFICATION_MODEL_PATH": str(changed_models["swapped"]), "RERANK_MODEL_PATH": str(changed_models["negated"])}
    result, report = verify(ml_tree, recorded, **changed)
    assert result.ret == 1
    classifier = report["models"][CLASSIFIER]
    flipped = {text for text, logits in calls.items() if max(logits, key=logits.get) in ("cooking", "travel")}
    assert {e["key"] for e in classifier["drifted_entries"] if e["kind"] == "decision"} == flipped
    assert all(e["what"].startswith("label ") for e in classifier["drifted_entries"] if e["kind"] == "decision")
    reranker = report["models"]["BAAI/bge-reranker-v2-m3"]
    assert reranker["decisions"] > 0 and reranker["worst"]["kind"] == "decision"
    assert reranker["measures"]["top-1 agreement"] == 0.0 and reranker["measures"]["min tau"] == -1.0
    assert report["models"]["BAAI/bge-m3"]["drifted"] == 0


def changed_lines(before: str, after: str) -> set[int]:
    """Lines of ``before`` (0-based) that ``after`` replaced or deleted, or next to which it inserted lines."""
    lines = set()
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, before.splitlines(), after.splitlines()).get_opcodes():
        if tag != "equal":
            lines.update(range(i1, i2) if i2 > i1 else (i1 - 1, i1))
    return lines


def entry_lines(text: str, model: str) -> dict[str, range]:
    """Each call entry of ``model`` in a cassette's text: the lines it spans (the save format: indent 2)."""
    lines, spans = text.splitlines(), {}
    start = lines.index(f"    {json.dumps(model)}: {{")
    calls = lines.index('      "calls": {', start)
    i = calls + 1
    while lines[i].startswith("        "):
        key = json.loads("{" + lines[i].strip().rstrip(",").rstrip("{").rstrip() + " 0}")
        end = i
        if lines[i].endswith("{"):
            while lines[end] not in ("        }", "        },"):
                end += 1
        spans[next(iter(key))] = range(i, end + 1)
        i = end + 1
    return spans


@pytest.mark.slow
def test_accept_rewrites_only_the_drifted_entries_lines(ml_tree, recorded, changed_models):
    before = {name: (recorded / name).read_text() for name in (MODELS, "integration/test_other.json")}
    result, report = verify(ml_tree, recorded, mode="accept", CLASSIFICATION_MODEL_PATH=str(changed_models["shifted"]))
    assert result.ret == 0, "accepted drift does not fail the run"
    drifted = {entry["key"] for entry in report["models"][CLASSIFIER]["drifted_entries"]}
    assert drifted and report["models"][CLASSIFIER]["accepted"] == len(drifted) and report["written"] == [MODELS]
    after = (recorded / MODELS).read_text()
    assert (recorded / "integration/test_other.json").read_text() == before["integration/test_other.json"]
    spans = entry_lines(before[MODELS], CLASSIFIER)
    allowed = {line for key in drifted for line in spans[key]}
    changed = changed_lines(before[MODELS], after)
    assert changed and changed <= allowed, "only the drifted entries' lines (fingerprint and environment unchanged)"
    assert all(changed & set(spans[key]) for key in drifted), "every drifted entry rewritten"
    fingerprints = [json.loads(text)["models"][CLASSIFIER]["fingerprint"] for text in (before[MODELS], after)]
    assert fingerprints[0] == fingerprints[1]

    result, report = verify(ml_tree, recorded, CLASSIFICATION_MODEL_PATH=str(changed_models["shifted"]))
    assert result.ret == 0 and report["models"][CLASSIFIER]["drifted"] == 0, "the accepted entries are the model's answers"


@pytest.mark.slow
def test_a_stale_cassette_is_verified_and_accept_makes_it_current(ml_tree, recorded, changed_models):
    """With another fingerprint the classifier's cassette is not replayed in ordinary runs; verify still checks
    the entries the tests would replay, and shows both fingerprints."""
    stale = {"CLASSIFICATION_MODEL_PATH": str(changed_models["stale"])}
    options = (f"--ml-cassette-dir={recorded}",)
    ml_tree.run("unit", *options, **stale).assert_outcomes(passed=1)
    assert ml_tree.loads()["stale_cassettes"] == [f"{MODELS} ({CLASSIFIER})"], "not replayed"

    result, report = verify(ml_tree, recorded, "unit", **stale)
    assert result.ret == 1 and ml_tree.loads()["stale_cassettes"] == [], "replayed as recorded under verify"
    fingerprint = report["models"][CLASSIFIER]["fingerprint"]
    assert fingerprint["recorded"][MODELS].startswith("recipe:") and fingerprint["now"].startswith("sha256:")
    result.stdout.fnmatch_lines([f"*{CLASSIFIER}: fingerprint recorded recipe:*; now sha256:*"])

    verify(ml_tree, recorded, "unit", mode="accept", **stale)
    assert json.loads((recorded / MODELS).read_text())["models"][CLASSIFIER]["fingerprint"] == fingerprint["now"]
    ml_tree.run("unit", *options, **stale).assert_outcomes(passed=1)
    assert ml_tree.loads()["stale_cassettes"] == []


def test_the_drift_report_as_markdown_and_in_a_ci_job_summary(ml_tree, recorded, changed_models):
    summary = ml_tree.root / "step-summary.md"
    markdown = ml_tree.root / "drift.md"
    result, _ = verify(
        ml_tree,
        recorded,
        f"--ml-drift-report={markdown}",
        CLASSIFICATION_MODEL_PATH=str(changed_models["shifted"]),
        GITHUB_STEP_SUMMARY=str(summary),
    )
    assert result.ret == 1
    text = markdown.read_text()
    assert summary.read_text() == text
    assert f"**Drift beyond tolerance: {CLASSIFIER}.**" in text
    assert "| model | checked | noise | numeric drift | decision drift | worst entry |" in text
    assert f"### `{CLASSIFIER}`" in text and "recorded with:" in text


def test_the_committed_cassettes_read_back_byte_for_byte():
    """accept and prune rewrite a cassette through the save format: every byte they do not change must come back."""
    from ml_models import PROJECT

    cassettes = sorted(PROJECT.cassettes.rglob("*.json"))
    assert cassettes
    for path in cassettes:
        text = path.read_text(encoding="utf-8")
        assert dump(json.loads(text)) == text, path


def test_a_drift_report_without_verify_is_a_usage_error(ml_tree):
    ml_tree.write("unit/test_nothing.py", "def test_nothing():\n    pass\n")
    result = ml_tree.run("--ml-drift-report=x.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ml-drift-report needs --ml-record=verify or accept (got --ml-record=none)*"])
    result = ml_tree.run("--ml-record=check")
    result.stderr.fnmatch_lines(["*--ml-record must be one of none, once, rewrite, verify, accept, prune; got 'check'*"])

