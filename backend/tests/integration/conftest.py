"""Fake models by default; real ones for tests marked ``use_real_models`` or using a cached fixture."""

import pytest


@pytest.fixture(scope="session")
def ml_model_policy() -> str:
    return "integration"


@pytest.fixture(scope="session")
def model_output_tolerance(pytestconfig) -> float:
    """Absolute tolerance between a batched and a single call: int8 quantizes activations per batch
    (padding included), which moves the embedded BGE-M3's term weights by up to about 0.07."""
    return 1e-1 if pytestconfig.getoption("ml_quantize") == "int8" else 1e-4


@pytest.fixture(scope="session")
def rerank_score_tolerance(pytestconfig) -> float:
    """The same for the reranker's logits (spread over about -6..6): int8 moves them by up to about 0.2."""
    return 0.5 if pytestconfig.getoption("ml_quantize") == "int8" else 1e-4


@pytest.fixture
def trained_sparse_model(sparse_embedding_model_cached):
    """Skips the test where the BGE-M3 in use has untrained weights (the seed-scale model)."""
    from app.ml import SPARSE_EMBEDDING, resolve_model_path
    from app.ml.seed_scale import has_random_weights

    path = resolve_model_path(SPARSE_EMBEDDING, build=False)
    if has_random_weights(path):
        pytest.skip(f"needs trained term weights; {path} is the seed-scale model, whose weights are random")
    return sparse_embedding_model_cached
