"""Fine-tuning a sequence classifier from a base encoder (torch and transformers, lazily)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path


def validate_examples(examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Check ``(text, label)`` pairs before any work: TypeError / ValueError on bad input."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError("examples must be a sequence of (text, label) pairs")
    pairs = []
    for i, example in enumerate(examples):
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise TypeError(f"example {i} is not a (text, label) pair: {example!r}")
        text, label = example
        if not isinstance(text, str) or not isinstance(label, str):
            raise TypeError(f"example {i}: text and label must be str, got {type(text).__name__}, {type(label).__name__}")
        if not text.strip() or not label.strip():
            raise ValueError(f"example {i}: text and label must not be empty")
        pairs.append((text, label))
    if len({label for _, label in pairs}) < 2:
        raise ValueError("training needs examples of at least two labels")
    return pairs


def model_version_for(base_name: str, examples: Sequence[tuple[str, str]], hyperparameters: dict) -> str:
    digest = hashlib.sha256(json.dumps([base_name, list(examples), hyperparameters], sort_keys=True).encode())
    return f"{Path(base_name).name}-ft-{digest.hexdigest()[:12]}"


def fine_tune(
    base_dir: Path,
    examples: Sequence[tuple[str, str]],
    out_dir: Path,
    *,
    epochs: int = 12,
    learning_rate: float = 1e-4,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
    base_name: str | None = None,
) -> str:
    """Fine-tune ``base_dir`` on ``examples`` and save model, tokenizer and label map to ``out_dir``.

    The save is atomic: ``out_dir`` holds the old model or the new one, never half of one.
    Returns the model version, which is also stored in the saved config.
    """
    pairs = validate_examples(examples)  # before the heavy imports: bad input fails fast

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = sorted({label for _, label in pairs})
    label2id = {label: i for i, label in enumerate(labels)}
    hyperparameters = {"epochs": epochs, "lr": learning_rate, "batch": batch_size, "seed": seed, "max_length": max_length}
    version = model_version_for(base_name or str(base_dir), pairs, hyperparameters)

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        trust_remote_code=False,
    )

    def loss(batch):
        inputs = tokenizer(
            [text for text, _ in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return model(**inputs, labels=torch.tensor([label2id[label] for _, label in batch])).loss

    _train(model, pairs, loss, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    model.config.model_version = version
    _save_atomically(model, tokenizer, Path(out_dir))
    return version


def fine_tune_cross_encoder(
    base_dir: Path,
    pairs: Sequence[tuple[str, str, bool]],
    out_dir: Path,
    *,
    epochs: int = 4,
    learning_rate: float = 5e-5,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 256,
    base_name: str | None = None,
) -> str:
    """Fine-tune ``base_dir`` as a cross-encoder on ``(query, passage, relevant)`` triples and save it to ``out_dir``.

    One output logit per pair (``num_labels=1``, binary cross-entropy): the layout FlagEmbedding's
    ``FlagReranker`` and bge-reranker models use. The save is atomic; returns the model version.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hyperparameters = {"epochs": epochs, "lr": learning_rate, "batch": batch_size, "seed": seed, "max_length": max_length}
    version = model_version_for(base_name or str(base_dir), [list(p) for p in pairs], hyperparameters)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, trust_remote_code=False)
    bce = torch.nn.BCEWithLogitsLoss()

    def loss(batch):
        inputs = tokenizer(
            [query for query, _, _ in batch],
            [passage for _, passage, _ in batch],
            padding=True,
            truncation="only_second",
            max_length=max_length,
            return_tensors="pt",
        )
        target = torch.tensor([float(relevant) for _, _, relevant in batch])
        return bce(model(**inputs).logits.view(-1), target)

    _train(model, list(pairs), loss, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    model.config.model_version = version
    _save_atomically(model, tokenizer, Path(out_dir))
    return version


def _train(model, examples: list, loss, *, epochs: int, learning_rate: float, batch_size: int, seed: int) -> None:
    """AdamW over shuffled batches of ``examples``; ``loss(batch)`` gives each batch's loss. Leaves the model in eval mode."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order = list(range(len(examples)))
    shuffler = random.Random(seed)
    model.train()
    for _ in range(epochs):
        shuffler.shuffle(order)
        for start in range(0, len(order), batch_size):
            loss([examples[i] for i in order[start : start + batch_size]]).backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


def _save_atomically(model, tokenizer, out_dir: Path) -> None:
    """``out_dir`` holds the old model or the new one, never half of one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; an existing ``target`` is moved aside first, then removed."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(old)  # rename(2) may replace an empty directory
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
