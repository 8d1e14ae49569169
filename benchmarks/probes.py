"""Measurements in a bare process (no pytest): the import and load floor, and int8 against fp32.

Run as ``python benchmarks/probes.py floor|quantize|check_cost|traced_import N [LIMIT]``; prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "backend"))

#: One import of the ML libraries in a fresh process, as ``argv[1]`` says: untraced, under coverage's
#: tracer measuring the repository (a stale test's dependency record), or so with the record's finder
#: that imports libraries with the tracer paused. Prints the seconds.
IMPORT_UNDER = """
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[2] + "/backend/tests", sys.argv[2] + "/backend"]
import coverage
from ml_fixtures.affected import recorder
collector = coverage.Coverage(data_file=None, config_file=False, source=[sys.argv[2]])
if sys.argv[1] == "paused":
    sys.meta_path.insert(0, recorder._UntracedLibraries(Path(sys.argv[2])))
start = time.perf_counter()
if sys.argv[1] != "untraced":
    collector.start()
import torch, transformers, FlagEmbedding
if sys.argv[1] != "untraced":
    collector.stop()
print(time.perf_counter() - start)
"""


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def floor(calls: int) -> dict:
    """Import the ML libraries, load each model once, then make the suite's model calls."""

    def imports():
        import FlagEmbedding  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

    from app.ml import loading
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    _, import_s = _timed(imports)
    sparse, sparse_s = _timed(loading.load_sparse_embedding_model)
    classifier, classifier_s = _timed(loading.load_classification_model)
    sparse_service, classifier_service = _fixed(SparseEmbeddingService, sparse), _fixed(MLClassificationService, classifier)
    _, inference_s = _timed(
        lambda: [
            (sparse_service.generate_embedding(f"python programming lesson {i}"), classifier_service.predict(f"goal {i}"))
            for i in range(calls)
        ]
    )
    return {
        "import_s": import_s,
        "load_sparse_s": sparse_s,
        "load_classifier_s": classifier_s,
        "inference_s": inference_s,
        "calls": calls,
    }


def _fixed(service_class, loaded):
    """A service whose loading seam returns ``loaded``."""
    service = service_class(db=None)
    service._load_model = lambda: loaded
    return service


def quantize(repeats: int, limit: int | None = None) -> dict:
    """fp32 against int8: load and inference time, top-1 agreement, top-10 search overlap.

    On the shipped dataset (its held-back texts as queries), or its first ``limit`` texts and a
    quarter as many queries.
    """
    from app.ml import loading
    from app.ml.embedded import load_dataset
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService

    loading.load_sparse_embedding_model()  # warm imports and file cache before timing either
    everything = load_dataset()
    rows = everything[:limit]
    texts = [row["text"] for row in rows]
    queries = [row["text"] for row in everything if row["split"] == "test"][: limit and max(1, limit // 4)]
    results = {}
    for dtype in ("fp32", "int8"):
        sparse, sparse_load = _timed(lambda: loading.load_sparse_embedding_model(device="cpu", dtype=dtype))
        classifier, classifier_load = _timed(lambda: loading.load_classification_model(device="cpu", dtype=dtype))
        sparse_service, classifier_service = _fixed(SparseEmbeddingService, sparse), _fixed(MLClassificationService, classifier)
        sparse_times, classifier_times = [], []
        for _ in range(repeats):
            documents, seconds = _timed(lambda: sparse_service.generate_embeddings(texts))
            sparse_times.append(seconds)
            predictions, seconds = _timed(lambda: classifier_service.predict_batch(texts, top_k=1))
            classifier_times.append(seconds)
        query_vectors = sparse_service.generate_embeddings(queries)
        top10 = [
            sorted(range(len(documents)), key=lambda d: -SparseEmbeddingService.lexical_score(q, documents[d]))[:10]
            for q in query_vectors
        ]
        results[dtype] = {
            "load_sparse_s": sparse_load,
            "load_classifier_s": classifier_load,
            "sparse_encode_s": statistics.median(sparse_times),
            "classify_s": statistics.median(classifier_times),
            "top1": [p.top.label for p in predictions],
            "top10": top10,
            "accuracy": sum(p.top.label == row["label"] for p, row in zip(predictions, rows)) / len(rows),
        }
    fp32, int8 = results["fp32"], results["int8"]
    agreement = sum(a == b for a, b in zip(fp32.pop("top1"), int8.pop("top1"))) / len(texts)
    overlaps = [len(set(a) & set(b)) / 10 for a, b in zip(fp32.pop("top10"), int8.pop("top10"))]
    return {
        "texts": len(texts),
        "queries": len(queries),
        "fp32": fp32,
        "int8": int8,
        "top1_agreement": agreement,
        "top10_overlap": statistics.mean(overlaps),
    }


def check_cost(repeats: int) -> dict:
    """What the modified-shared-model check costs: on the seed-scale BGE-M3 (bge-m3's size, 2.2 GB)
    and on the two embedded models, each on CPU in fp32 after one inference (its pages present).

    The snapshot is taken at load (``watch``); ``ModelSnapshot.changes`` runs after every test, and
    ``deferred_changes`` (the scan of written pages, where it does not fit per test) at the end of
    each module. Every timed check must find nothing.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend" / "tests"))
    import functools
    import gc

    from app.ml import loading
    from app.ml.seed_scale import seed_scale_bge_m3_dir
    from app.services.ml_classification_service import MLClassificationService
    from app.services.sparse_embedding_service import SparseEmbeddingService
    from ml_fixtures.mutation import watch

    models = {
        "seed_scale_bge_m3": (lambda: loading.load_sparse_embedding_model(seed_scale_bge_m3_dir(), device="cpu"), "sparse"),
        "embedded_bge_m3": (lambda: loading.load_sparse_embedding_model(device="cpu"), "sparse"),
        "embedded_classifier": (lambda: loading.load_classification_model(device="cpu"), "classifier"),
    }
    results = {}
    for name, (load, kind) in models.items():
        loaded = load()
        texts = ["a first text", "a second one"]
        if kind == "sparse":
            _fixed(SparseEmbeddingService, loaded).generate_embeddings(texts)
        else:
            _fixed(MLClassificationService, loaded).predict_batch(texts)
        snapshot, snapshot_s = _timed(functools.partial(watch, loaded))
        per_test, deferred = [], []
        for i in range(repeats):
            changes, seconds = _timed(snapshot.changes)
            assert changes == [], changes
            per_test.append(seconds)
            if i < max(repeats // 20, 5):
                changes, seconds = _timed(snapshot.deferred_changes)
                assert changes == [], changes
                deferred.append(seconds)
        results[name] = {
            "tensors": len(snapshot.tensors),
            "modules": len(snapshot.modules),
            "objects": len(snapshot.attributes.dicts),
            "mapped_pages": snapshot.mapped.pages,
            "mapped_tensors": len(snapshot.mapped.spans),
            "checksummed_tensors": len(snapshot.checksums.indices) + len(snapshot.deferred_checksums.indices),
            "pages_scanned_per_test": snapshot.pages_per_test,
            "snapshot_ms": 1000 * snapshot_s,
            "check_ms_median": 1000 * statistics.median(per_test),
            "check_ms_max": 1000 * max(per_test),
            "deferred_check_ms_median": 1000 * statistics.median(deferred),
            "method": snapshot.mapped.method.value,
        }
        snapshot.close()
        del loaded, snapshot
        gc.collect()
    return {"repeats": repeats, **results}


def traced_import(repeats: int) -> dict:
    """The import of torch, transformers and FlagEmbedding in fresh processes, alternating: untraced,
    traced by the dependency record, traced with libraries imported under the tracer paused."""
    found: dict[str, list[float]] = {"untraced": [], "traced": [], "paused": []}
    for _ in range(repeats):
        for mode, seconds in found.items():
            command = [sys.executable, "-c", IMPORT_UNDER, mode, str(REPO)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            seconds.append(float(done.stdout))
    return {mode: {"median": statistics.median(s), "min": min(s), "max": max(s)} for mode, s in found.items()}


if __name__ == "__main__":
    probe, numbers = sys.argv[1], map(int, sys.argv[2:])
    probes = {"floor": floor, "quantize": quantize, "check_cost": check_cost, "traced_import": traced_import}
    print(json.dumps(probes[probe](*numbers)))
