"""How far a model's answers moved from its recordings: the comparisons of ``--ml-record=verify``.

Each model's declaration names one (``ModelSpec.compare``). A comparison takes one cassette's
recorded outputs of the model and the outputs the model in use gives now for the same inputs, and
classes every entry:

- ``noise``: every change within the declared tolerance (batching, threads, another CPU, a library
  upgrade that changes nothing that matters);
- ``numeric``: a change beyond the tolerance, every decision kept;
- ``decision``: a decision changed: a label flipped, a ranking's order, the set of terms.

Tolerances are absolute, in the output's own unit, and each comparison's defaults say what they
mean. A decision counts only where the recording made it clearly, by more than changes within
tolerance could undo (the ``tie`` and ``margin`` below): noise never reads as a decision.

Nothing here imports torch: the outputs are the recorded kind, plain numbers in dicts and lists.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, ClassVar

from ml_fixtures.keys import input_of_key


class Kind(enum.StrEnum):
    NOISE = "noise"
    NUMERIC = "numeric"
    DECISION = "decision"


_RANK = {Kind.NOISE: 0, Kind.NUMERIC: 1, Kind.DECISION: 2}


@dataclass(frozen=True)
class EntryDrift:
    """How one recorded entry compares with the model's answer now."""

    key: str
    kind: Kind
    #: The entry's largest change, in the comparison's unit (``Comparison.unit``).
    change: float
    tolerance: float
    #: Other measures, e.g. ``{"jaccard": 0.8}``.
    measures: dict[str, float] = field(default_factory=dict)
    #: What changed, in words: the decision, or a near tie that flipped ("" when nothing of note).
    what: str = ""
    #: The group it was judged in (a reranker's query); "" for an entry judged alone.
    group: str = ""

    @property
    def drifted(self) -> bool:
        """Beyond tolerance: ``--ml-record=accept`` rewrites it."""
        return self.kind is not Kind.NOISE

    @property
    def severity(self) -> tuple[int, float]:
        """Decisions first, then how many tolerances the change spans."""
        ratio = self.change / self.tolerance if self.tolerance > 0 else (math.inf if self.change else 0.0)
        return _RANK[self.kind], ratio


def _kind(change: float, tolerance: float) -> Kind:
    return Kind.NUMERIC if change > tolerance else Kind.NOISE


class Comparison:
    """Compares one cassette's recorded outputs of a model with the live ones; subclasses are frozen dataclasses."""

    #: What ``EntryDrift.change`` measures, as the report names it.
    unit: ClassVar[str] = "change"
    #: Per-entry measures summed up per model, and which end is the worse: name -> "min" | "max".
    summary_measures: ClassVar[dict[str, str]] = {}

    def compare(self, recorded: Mapping[str, Any], live: Mapping[str, Any]) -> list[EntryDrift]:
        """One :class:`EntryDrift` per recorded key (``live`` holds the same keys)."""
        return [self.entry(key, recorded[key], live[key]) for key in recorded]

    def entry(self, key: str, recorded: Any, live: Any) -> EntryDrift:
        raise NotImplementedError

    def summary(self, drifts: Sequence[EntryDrift]) -> dict[str, float]:
        """The model's measures over all its entries: the largest change, and each summary measure's worst."""
        summary = {f"max {self.unit}": max((d.change for d in drifts), default=0.0)}
        for name, worse in self.summary_measures.items():
            values = [d.measures[name] for d in drifts if name in d.measures]
            if values:
                summary[f"{worse} {name}"] = min(values) if worse == "min" else max(values)
        return summary

    def declared(self) -> dict[str, object]:
        """The comparison and its settings, as the report shows them."""
        return {"comparison": type(self).__name__, **dataclasses.asdict(self)}


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{path}/{key}").items()}
    if isinstance(value, list | tuple):
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{path}/{i}").items()}
    return {path: value}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Numeric(Comparison):
    """Any output: every number within ``atol``; a changed structure or non-numeric value is a decision.

    The comparison of a model that declares none.
    """

    atol: float = 1e-4

    def entry(self, key: str, recorded: Any, live: Any) -> EntryDrift:
        before, after = _leaves(recorded), _leaves(live)
        if before.keys() != after.keys():
            return EntryDrift(key, Kind.DECISION, math.inf, self.atol, what="the output's structure changed")
        changed = [p for p in before if not (_number(before[p]) and _number(after[p])) and before[p] != after[p]]
        if changed:
            return EntryDrift(key, Kind.DECISION, math.inf, self.atol, what=f"value at {changed[0] or '/'} changed")
        change = max((abs(before[p] - after[p]) for p in before), default=0.0)
        return EntryDrift(key, _kind(change, self.atol), change, self.atol)


@dataclass(frozen=True)
class SparseWeights(Comparison):
    """Sparse lexical weights (BGE-M3's ``lexical_weights``: token -> weight >= 0): the set of terms, and each weight.

    The model keeps a term when its weight is above 0 (a ReLU, then FlagEmbedding drops the zeros), so
    a term with a tiny weight comes and goes with the last digits. A term lighter than ``margin`` on
    both sides hovers at that threshold and is left out of the set comparison; a term at or above
    ``margin`` on one side and absent from the other is a change of the term set (lost or gained),
    measured by the Jaccard index of the two sets. Defaults:

    - ``atol=1e-3``: the largest weight change that is noise, about 0.5 % of a content word's weight
      (0.05-0.5 here). An unchanged model recomputed in other batches moves them by 1e-5 here (the
      cassettes' rounding); int8 moved the fp32 recordings by up to 0.2; fp16, with about three
      significant digits, is expected near 1e-3 (not measured here).
    - ``margin=0.01``: a term lighter than that adds less than 0.01 x 0.5 to a lexical match score.
      Kept above ``atol``, a term can only drop out by a change beyond tolerance.
    - ``min_jaccard=1.0``: any lost or gained term is a decision; lower it to allow a few.
    """

    unit: ClassVar[str] = "weight change"
    summary_measures: ClassVar[dict[str, str]] = {"jaccard": "min"}
    atol: float = 1e-3
    margin: float = 0.01
    min_jaccard: float = 1.0

    def entry(self, key: str, recorded: Mapping[str, float], live: Mapping[str, float]) -> EntryDrift:
        terms = recorded.keys() | live.keys()
        change = max((abs(recorded.get(t, 0.0) - live.get(t, 0.0)) for t in terms), default=0.0)
        kept = {t for t in terms if max(recorded.get(t, 0.0), live.get(t, 0.0)) >= self.margin}
        before = {t for t in kept if recorded.get(t, 0.0) > 0}
        after = {t for t in kept if live.get(t, 0.0) > 0}
        union = before | after
        jaccard = len(before & after) / len(union) if union else 1.0
        lost, gained = sorted(before - after), sorted(after - before)
        what = "; ".join(
            part for part in (f"lost {', '.join(lost)}" if lost else "", f"gained {', '.join(gained)}" if gained else "") if part
        )
        kind = Kind.DECISION if jaccard < self.min_jaccard else _kind(change, self.atol)
        return EntryDrift(key, kind, change, self.atol, {"jaccard": jaccard}, what)


def softmax(row: Sequence[float]) -> list[float]:
    peak = max(row)
    exps = [math.exp(x - peak) for x in row]
    total = sum(exps)
    return [x / total for x in exps]


def _best(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass(frozen=True)
class Logits(Comparison):
    """A classifier's logits (label -> logit): the predicted label, and each label's probability (softmax).

    Defaults:

    - ``atol=1e-3``: the largest probability change that is noise. An unchanged model recomputed in
      other batches moves them by 4e-6 here; int8 moved the fp32 recordings by up to 0.03.
    - ``tie=None``: twice ``atol``. A flipped top label is a decision when the recording preferred
      its label by at least ``tie`` in probability; a flip between labels closer than that is a near
      tie (reported, numeric at most), since changes within tolerance could make it.
    """

    unit: ClassVar[str] = "probability change"
    summary_measures: ClassVar[dict[str, str]] = {"logit change": "max"}
    atol: float = 1e-3
    tie: float | None = None

    def entry(self, key: str, recorded: Mapping[str, float], live: Mapping[str, float]) -> EntryDrift:
        if recorded.keys() != live.keys():
            gone, new = sorted(recorded.keys() - live.keys()), sorted(live.keys() - recorded.keys())
            return EntryDrift(key, Kind.DECISION, 1.0, self.atol, what=f"labels changed: -{gone} +{new}")
        labels = sorted(recorded)
        before, after = [recorded[label] for label in labels], [live[label] for label in labels]
        p, q = softmax(before), softmax(after)
        change = max(abs(a - b) for a, b in zip(p, q))
        measures = {"logit change": max(abs(a - b) for a, b in zip(before, after))}
        was, now = _best(p), _best(q)
        if was == now:
            return EntryDrift(key, _kind(change, self.atol), change, self.atol, measures)
        margin, tie = p[was] - p[now], 2 * self.atol if self.tie is None else self.tie
        if margin >= tie:
            return EntryDrift(key, Kind.DECISION, change, self.atol, measures, f"label {labels[was]} -> {labels[now]}")
        what = f"near tie: label {labels[was]} -> {labels[now]} (recorded {margin:.2g} apart, tie {tie:g})"
        return EntryDrift(key, _kind(change, self.atol), change, self.atol, measures, what)


def first_of_pair(key: str) -> str:
    """The query of a ``(query, text)`` pair's key; "" for a key of one text (all such entries rank together)."""
    value = input_of_key(key)
    return value[0] if isinstance(value, tuple) else ""


@dataclass(frozen=True)
class Scores(Comparison):
    """A reranker's relevance scores, one per ``(query, text)`` pair: per query, the order of its texts and each score.

    Per query (``group(key)``): top-1 agreement (the live best text was a recorded best, within
    ``tie``), Kendall's tau between the recorded and the live order over the pairs of texts the
    recording ordered clearly (scores at least ``tie`` apart), and each score's change. Defaults:

    - ``atol=1e-2``: the largest score change that is noise, on logits spread over about -6..6 here.
      An unchanged model recomputed in other batches moves them by 2e-4 here (padding moves with the
      batch); int8 moved the fp32 recordings by up to 3.5, and swapped texts.
    - ``tie=None``: twice ``atol``: two texts scored closer than that have no recorded order.
    - ``min_tau=1.0``: a decision when a clearly ordered pair swapped (tau below 1) or the clear best
      text lost its place; lower it to allow swaps further down while the top-1 stays a decision.

    The entries of a swapped pair, or of a changed top-1, are the decision's entries.
    """

    unit: ClassVar[str] = "score change"
    summary_measures: ClassVar[dict[str, str]] = {"tau": "min"}
    atol: float = 1e-2
    tie: float | None = None
    min_tau: float = 1.0
    group: Callable[[str], str] = field(default=first_of_pair, compare=False)

    def declared(self) -> dict[str, object]:
        return {"comparison": type(self).__name__, "atol": self.atol, "tie": self.tie, "min_tau": self.min_tau}

    def compare(self, recorded: Mapping[str, float], live: Mapping[str, float]) -> list[EntryDrift]:
        groups: dict[str, list[str]] = {}
        for key in recorded:
            groups.setdefault(self.group(key), []).append(key)
        return [drift for group, keys in groups.items() for drift in self._query(group, keys, recorded, live)]

    def _query(self, group: str, keys: list[str], recorded: Mapping[str, float], live: Mapping[str, float]) -> list[EntryDrift]:
        tie = 2 * self.atol if self.tie is None else self.tie
        before, after = [recorded[k] for k in keys], [live[k] for k in keys]
        clear = [(i, j) for i, j in combinations(range(len(keys)), 2) if abs(before[i] - before[j]) >= tie]
        swapped = [(i, j) for i, j in clear if (before[i] - before[j]) * (after[i] - after[j]) < 0]
        tau = (len(clear) - 2 * len(swapped)) / len(clear) if clear else 1.0
        was, now = _best(before), _best(after)
        top1 = before[was] - before[now] < tie
        involved = {i for pair in swapped for i in pair} | ({was, now} if not top1 else set())
        decision = not top1 or tau < self.min_tau
        what = ""
        if decision:
            what = f"order changed (tau {tau:.3f})" if top1 else f"top-1 changed: text {was + 1} -> {now + 1} of {len(keys)}"
        drifts = []
        for i, key in enumerate(keys):
            change = abs(before[i] - after[i])
            kind = Kind.DECISION if decision and i in involved else _kind(change, self.atol)
            measures = {"tau": tau, "top1": 1.0 if top1 else 0.0}
            drifts.append(EntryDrift(key, kind, change, self.atol, measures, what if kind is Kind.DECISION else "", group))
        return drifts

    def summary(self, drifts: Sequence[EntryDrift]) -> dict[str, float]:
        summary = super().summary(drifts)
        top1 = {d.group: d.measures["top1"] for d in drifts}
        summary["queries"] = len(top1)
        summary["top-1 agreement"] = sum(top1.values()) / len(top1) if top1 else 1.0
        return summary
