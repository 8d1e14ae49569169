"""The seed-scale BGE-M3: bge-m3's architecture at full size (568M parameters, 2.2 GB), seeded
random weights, for measuring what loading and sharing cost at the production model's size.

    make seed-scale-model        # = PYTHONPATH=backend python -m app.ml.seed_scale; prints its directory
    SPARSE_EMBEDDING_MODEL_PATH=<that directory> pytest backend/tests/integration

XLMRobertaModel with bge-m3's configuration (hidden 1024, 24 layers, 16 heads, intermediate
4096, vocabulary 250002, 8194 positions), the packaged MiniLM tokenizer (its ids fit that
vocabulary), and seeded random sparse and ColBERT heads, in bge-m3's layout, so that
``BGEM3FlagModel`` loads it unchanged. Built once into the model cache like the embedded models
(deterministic, atomic, under a lock) and never by ``make test``. Its weights are untrained:
term weights and rankings mean nothing on it, and the tests that need them skip there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from app.ml.embedded import SEED, build_once, packaged_minilm_dir

CONFIG = {
    "architectures": ["XLMRobertaModel"],
    "model_type": "xlm-roberta",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "vocab_size": 250002,
    "max_position_embeddings": 8194,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "layer_norm_eps": 1e-5,
}
RECIPE = {"recipe": 1, "seed": SEED, "config": CONFIG, "weights": "random"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _build(dest: Path) -> None:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(SEED)
    model = XLMRobertaModel(XLMRobertaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}))
    model.save_pretrained(dest, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(packaged_minilm_dir() / name, dest / name)
    hidden = CONFIG["hidden_size"]
    generator = torch.Generator().manual_seed(SEED)
    torch.save(
        {"weight": torch.randn(1, hidden, generator=generator) / hidden**0.5, "bias": torch.zeros(1)},
        dest / "sparse_linear.pt",
    )
    torch.save(
        {"weight": torch.randn(hidden, hidden, generator=generator) / hidden**0.5, "bias": torch.zeros(hidden)},
        dest / "colbert_linear.pt",
    )


def seed_scale_bge_m3_dir(cache_dir: Path | None = None, build: bool = True) -> Path:
    """The seed-scale model's directory, built once (about 30 s, 2.2 GB)."""
    return build_once(
        "bge-m3-seed-scale", RECIPE, _build, cache_dir, allow_build=build,
        what="the seed-scale BGE-M3 (568M parameters, 2.2 GB)", expected="30 s",
    )


def has_random_weights(model_dir: Path) -> bool:
    """True for a directory built here with untrained weights (the seed-scale model)."""
    recipe = Path(model_dir) / "recipe.json"
    return recipe.is_file() and json.loads(recipe.read_text()).get("weights") == "random"


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(seed_scale_bge_m3_dir())
