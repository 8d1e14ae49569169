"""How well the embedded models do on texts they were not fitted on (the shipped dataset's held-back
texts). ``python benchmarks/fidelity.py``; prints JSON.

BGE-M3: Spearman rank correlation between each token's weight and its target in the term-importance
table, the share of function-word tokens with weight 0, the share of content-word tokens with a
weight above 0, and the median ratio of a text's mean function-word weight to its mean
content-word weight. Reranker: the share of held-back queries whose relevant text it ranks first
among one text of each category (``app.ml.embedded.ranking_cases``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def measure(texts: list[str]) -> dict:
    import torch

    from app.ml import loading, term_importance
    from app.ml.embedded import token_targets

    loaded = loading.load_sparse_embedding_model(device="cpu")
    table, bge = term_importance.shipped(), loaded.model
    weights, targets, function_zero, content_positive, ratios = [], [], [], [], []
    for text in texts:
        inputs = loaded.tokenizer(text, return_offsets_mapping=True, return_tensors="pt", truncation=True)
        offsets = [tuple(o) for o in inputs.pop("offset_mapping")[0].tolist()]
        with torch.inference_mode():
            hidden = bge.model.model(**inputs).last_hidden_state
            token_weights = torch.relu(bge.model.sparse_linear(hidden))[0, :, 0].tolist()
        token_target = token_targets(text, offsets, table)
        spans = [(m.start(), m.end(), m.group()) for m in term_importance.WORD.finditer(text.lower())]
        function, content = [], []
        for (start, end), weight, target in zip(offsets, token_weights, token_target):
            if end == start:
                continue  # special tokens: the service drops them
            weights.append(weight)
            targets.append(target)
            word = next(w for s, e, w in spans if s <= start < e)
            (function if table.is_function(word) else content).append(weight)
        function_zero += [w == 0 for w in function]
        content_positive += [w > 0 for w in content]
        if function and content:
            ratios.append(statistics.fmean(function) / statistics.fmean(content))
    return {
        "texts": len(texts),
        "tokens": len(weights),
        "spearman": round(spearman(weights, targets), 3),
        "function_tokens_at_zero": round(sum(function_zero) / len(function_zero), 3),
        "content_tokens_weighted": round(sum(content_positive) / len(content_positive), 3),
        "median_function_content_ratio": round(statistics.median(ratios), 3),
    }


def reranker_first() -> dict:
    from app.ml import loading
    from app.ml.embedded import ranking_cases

    reranker = loading.load_rerank_model(device="cpu").model
    cases = ranking_cases()
    first = 0
    for query, candidates, relevant in cases:
        scores = reranker.compute_score([[query, candidate] for candidate in candidates])
        first += max(range(len(candidates)), key=scores.__getitem__) == relevant
    return {"queries": len(cases), "candidates_each": len(cases[0][1]), "relevant_ranked_first": round(first / len(cases), 3)}


if __name__ == "__main__":
    from app.ml.embedded import dataset_examples

    print(json.dumps({**measure([text for text, _ in dataset_examples("test")]), "reranker": reranker_first()}))
