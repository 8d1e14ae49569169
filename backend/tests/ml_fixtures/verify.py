"""``--ml-record=verify`` and ``accept``: the recorded entries recomputed on the real models and compared.

At the end of a run, every entry of each cassette that a selected test used (``usage.py``) is
recomputed by the model the run resolves (the pool: embedded, ``*_MODEL_PATH``, ``--ml-quantize``,
``--ml-device``) through the service's own model call, in batches: the keys are turned back into
calls by ``ModelCall.calls_for``, the results go through ``ModelCall.outputs`` and are rounded as a
recording is. Each model's declared comparison (``ModelSpec.compare``, ``drift.py``) classes each
entry as noise, numeric drift or decision drift. ``accept`` then rewrites the drifted entries, and
nothing else, in the cassettes (``Cassettes.edit``, written by ``Cassettes.save``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ml_fixtures.cassettes import Cassettes, rounded
from ml_fixtures.declaration import DeclarationError, LoadedModel, ModelSpec, Project
from ml_fixtures.drift import Comparison, EntryDrift, Kind

#: Keys per batch of model calls: the service's own batching splits each call further.
BATCH = 64


def recompute(spec: ModelSpec, loaded: LoadedModel, keys: list[str]) -> dict[str, object]:
    """Key -> the model's output now, through the service's model call on ``loaded``, rounded as recorded."""
    service = spec.bare_service(loaded)
    method = getattr(spec.service, spec.call.method)
    live: dict[str, object] = {}
    for start in range(0, len(keys), BATCH):
        batch = keys[start : start + BATCH]
        for args in spec.call.calls_for(batch):
            args = tuple(args)
            for key, output in spec.call_entries(service, args, {}, method(service, *args)):
                live[key] = rounded(output)
        missing = [key for key in batch if key not in live]
        if missing:
            raise DeclarationError(
                f"ModelSpec {spec.name!r}: ModelCall.calls_for gave calls that do not ask for {missing[0]!r} "
                f"(and {len(missing) - 1} more); it must be the inverse of ModelCall.inputs"
            )
    return live


@dataclass
class ModelDrift:
    """One model's verification: each entry's drift, and both sides of what it was recorded with."""

    model: str
    comparison: Comparison | None = None
    #: ``(cassette, drift)`` of every entry checked.
    entries: list[tuple[str, EntryDrift]] = field(default_factory=list)
    #: ``(cassette, key)`` -> ``(recorded, live)`` output.
    outputs: dict[tuple[str, str], tuple[object, object]] = field(default_factory=dict)
    #: Cassette -> the fingerprint its entry was recorded with.
    fingerprints: dict[str, str | None] = field(default_factory=dict)
    fingerprint_now: str | None = None
    #: Cassette -> what its entry was recorded with (None: a cassette from before this was recorded).
    recorded_with: dict[str, dict | None] = field(default_factory=dict)
    now: dict[str, str] = field(default_factory=dict)
    #: Why the model could not be verified ("" when it was).
    unverified: str = ""
    #: The entries ``accept`` rewrote.
    accepted: int = 0
    #: Loading the model (if the run had not) and recomputing its entries.
    seconds: float = 0.0

    def count(self, kind: Kind) -> int:
        return sum(1 for _, drift in self.entries if drift.kind is kind)

    @property
    def drifted(self) -> list[tuple[str, EntryDrift]]:
        return [(cassette, drift) for cassette, drift in self.entries if drift.drifted]

    @property
    def identical(self) -> int:
        return sum(1 for recorded, live in self.outputs.values() if recorded == live)

    def worst(self) -> dict | None:
        if not self.entries:
            return None
        cassette, drift = max(self.entries, key=lambda pair: pair[1].severity)
        recorded, live = self.outputs[(cassette, drift.key)]
        return {
            "cassette": cassette,
            "key": drift.key,
            "kind": drift.kind.value,
            "unit": self.comparison.unit if self.comparison else "change",
            "change": drift.change,
            "tolerance": drift.tolerance,
            "what": drift.what,
            "measures": drift.measures,
            "recorded": recorded,
            "live": live,
        }

    def to_dict(self) -> dict:
        numeric, decisions = self.count(Kind.NUMERIC), self.count(Kind.DECISION)
        return {
            "checked": len(self.entries),
            "identical": self.identical,
            "noise": self.count(Kind.NOISE),
            "numeric": numeric,
            "decisions": decisions,
            "drifted": numeric + decisions,
            "accepted": self.accepted,
            "seconds": round(self.seconds, 3),
            "unverified": self.unverified,
            "declared": self.comparison.declared() if self.comparison else None,
            "measures": self.comparison.summary([d for _, d in self.entries]) if self.comparison else {},
            "worst": self.worst(),
            "drifted_entries": [
                {"cassette": cassette, "key": d.key, "kind": d.kind.value, "change": d.change, "what": d.what}
                for cassette, d in self.drifted
            ],
            "fingerprint": {"recorded": self.fingerprints, "now": self.fingerprint_now},
            "environment": {"recorded": self.recorded_with, "now": self.now},
        }


@dataclass
class DriftReport:
    """The run's verification: per model, and what ``accept`` wrote."""

    mode: str
    cassettes: list[str] = field(default_factory=list)
    models: dict[str, ModelDrift] = field(default_factory=dict)
    #: Models in the cassettes that the project does not declare (nothing replays them).
    undeclared: list[str] = field(default_factory=list)
    seconds: float = 0.0
    written: list[str] = field(default_factory=list)

    @property
    def drifted_models(self) -> list[str]:
        return [name for name, model in self.models.items() if model.drifted]

    @property
    def unverified_models(self) -> list[str]:
        return [name for name, model in self.models.items() if model.unverified]

    @property
    def failed(self) -> bool:
        """Verify fails on drift beyond tolerance; both fail where a model could not be verified."""
        return bool(self.unverified_models) or (self.mode == "verify" and bool(self.drifted_models))

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "seconds": round(self.seconds, 3),
            "cassettes": self.cassettes,
            "entries": sum(len(model.entries) for model in self.models.values()),
            "models": {name: model.to_dict() for name, model in sorted(self.models.items())},
            "undeclared_models": self.undeclared,
            "written": self.written,
        }


def verify(
    cassettes: Cassettes,
    used: Iterable[str],
    project: Project,
    pooled: Callable[[ModelSpec], LoadedModel],
    environment: Callable[[str | None], dict[str, str]],
    mode: str,
) -> DriftReport:
    """Every entry of the ``used`` cassettes recomputed by its model (``pooled``) and compared."""
    start = time.perf_counter()
    report = DriftReport(mode, sorted(used))
    by_model: dict[str, dict[str, dict]] = {}
    for cassette in report.cassettes:
        for model, entry in cassettes.models_in(cassette).items():
            by_model.setdefault(model, {})[cassette] = entry
    declared = {spec.model_name: spec for spec in project.models}
    for model, entries in sorted(by_model.items()):
        spec = declared.get(model)
        if spec is None:
            report.undeclared.append(model)
            continue
        result = report.models[model] = ModelDrift(model, spec.compare)
        result.fingerprints = {cassette: entry.get("fingerprint") for cassette, entry in entries.items()}
        result.recorded_with = {cassette: entry.get("recorded_with") for cassette, entry in entries.items()}
        result.fingerprint_now = cassettes.current_fingerprint(spec)
        began = time.perf_counter()
        try:
            loaded = pooled(spec)
        except project.unavailable_errors as exc:
            result.unverified = str(exc)
            continue
        result.now = environment(loaded.device)
        live = recompute(spec, loaded, sorted({key for entry in entries.values() for key in entry["calls"]}))
        for cassette, entry in entries.items():
            calls = entry["calls"]
            result.entries += [(cassette, drift) for drift in spec.compare.compare(calls, {k: live[k] for k in calls})]
            result.outputs.update({(cassette, key): (output, live[key]) for key, output in calls.items()})
        result.seconds = time.perf_counter() - began
    report.seconds = time.perf_counter() - start
    return report


def accept(report: DriftReport, cassettes: Cassettes) -> None:
    """Rewrite the drifted entries with the live outputs; in each model entry touched, the fingerprint and the
    environment become the current ones. A model entry with no drift and the current fingerprint is left alone."""
    for model in report.models.values():
        if model.unverified:
            continue
        drifted: dict[str, list[EntryDrift]] = {}
        for cassette, drift in model.drifted:
            drifted.setdefault(cassette, []).append(drift)
        for cassette, recorded in model.fingerprints.items():
            stale = model.fingerprint_now is not None and recorded != model.fingerprint_now
            if not drifted.get(cassette) and not stale:
                continue
            entry = cassettes.edit(cassette)["models"][model.model]
            for drift in drifted.get(cassette, []):
                entry["calls"][drift.key] = model.outputs[(cassette, drift.key)][1]
            model.accepted += len(drifted.get(cassette, []))
            if model.fingerprint_now is not None:
                entry["fingerprint"] = model.fingerprint_now
            entry["recorded_with"] = model.now
    report.written = [cassettes.relative(path) for path in cassettes.save()]


def _environment(values: dict | None) -> str:
    """``FlagEmbedding 1.4.2, torch 2.13.0, transformers 5.23.0, cpu (x86_64), dtype default``: the same for equal dicts."""
    if not values:
        return "unknown (a cassette from before they were recorded)"
    items = sorted(values.items(), key=lambda item: (item[0] in ("device", "dtype"), item[0].lower()))
    return ", ".join(value if name == "device" else f"{name} {value}" for name, value in items)


def _declared(declared: dict) -> str:
    """``SparseWeights(atol=0.001, margin=0.01, min_jaccard=1.0)``."""
    settings = ", ".join(f"{name}={value}" for name, value in declared.items() if name != "comparison")
    return f"{declared['comparison']}({settings})"


def _worst(model: ModelDrift, with_entry: bool) -> str:
    worst = model.worst()
    if worst is None:
        return model.unverified or "-"
    text = f"{worst['kind']}: {worst['unit']} {worst['change']:.2g} (tolerance {worst['tolerance']:g})"
    if worst["what"]:
        text += f", {worst['what']}"
    return text + (f" in {worst['cassette']} {worst['key'][:60]!r}" if with_entry and worst["kind"] != "noise" else "")


def _sides(model: ModelDrift) -> list[str]:
    """What the model's entries were recorded with, and what they are compared with now."""
    recorded = sorted({_environment(values) for values in model.recorded_with.values()})
    now = _environment(model.now) if model.now else "not loaded"
    lines = [f"recorded with: {' | '.join(recorded)}; now: {'the same' if recorded == [now] else now}"]
    fingerprints = sorted({str(value) for value in model.fingerprints.values()})
    if fingerprints != [str(model.fingerprint_now)]:
        lines.append(f"fingerprint recorded {' | '.join(fingerprints)}; now {model.fingerprint_now}")
    return lines


def terminal_lines(report: DriftReport) -> list[str]:
    data = report.to_dict()
    lines = [
        f"--ml-record={report.mode}: {len(report.cassettes)} cassettes, {data['entries']} entries recomputed "
        f"and compared in {report.seconds:.2f} s"
    ]
    width = max([len("model"), *map(len, report.models)])
    lines.append(f"  {'model'.ljust(width)}  checked  noise  numeric  decision  seconds  worst entry")
    for name, model in sorted(report.models.items()):
        checked, noise, numeric, decisions = (len(model.entries), *(model.count(kind) for kind in Kind))
        counts = f"{checked:7d}  {noise:5d}  {numeric:7d}  {decisions:8d}  {model.seconds:7.2f}"
        lines.append(f"  {name.ljust(width)}  {counts}  {_worst(model, False)}")
    for name, model in sorted(report.models.items()):
        row = data["models"][name]
        if row["measures"]:
            measures = ", ".join(f"{measure} {value:.3g}" for measure, value in row["measures"].items())
            lines.append(f"  {name}: {measures}, compared as {_declared(row['declared'])}")
        lines += [f"  {name}: {line}" for line in _sides(model)]
    for name in report.undeclared:
        lines.append(f"  {name}: not declared in the project (nothing replays it); not verified")
    for name in report.unverified_models:
        lines.append(f"  {name}: NOT VERIFIED: {report.models[name].unverified}")
    for name in report.drifted_models:
        model = report.models[name]
        lines.append(
            f"  DRIFT beyond tolerance: {name}: {len(model.drifted)} entries, {model.count(Kind.DECISION)} of them decisions; "
            f"worst {_worst(model, True)}"
        )
    if report.mode == "verify" and report.drifted_models:
        lines.append("  accept them with --ml-record=accept (the same tests selected), or find what moved")
    for path in report.written:
        lines.append(f"  accepted into {path}")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: DriftReport, limit: int = 20) -> str:
    """The report for a CI job summary."""
    data = report.to_dict()
    drifted = ", ".join(report.drifted_models)
    verdict = f"**Drift beyond tolerance: {drifted}.**" if drifted else "No drift beyond tolerance."
    lines = [
        "## Cassette verification",
        "",
        f"`--ml-record={report.mode}`: {len(report.cassettes)} cassettes, {data['entries']} entries recomputed and "
        f"compared in {report.seconds:.1f} s. {verdict}",
        "",
        "| model | checked | noise | numeric drift | decision drift | worst entry |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, model in sorted(report.models.items()):
        row = data["models"][name]
        counts = " | ".join(str(row[column]) for column in ("checked", "noise", "numeric", "decisions"))
        lines.append(f"| `{name}` | {counts} | {_cell(_worst(model, True))} |")
    for name, model in sorted(report.models.items()):
        row = data["models"][name]
        lines += ["", f"### `{name}`", ""]
        if row["declared"]:
            lines.append(f"- compared as `{_declared(row['declared'])}`")
        if row["measures"]:
            lines.append("- " + ", ".join(f"{measure} {value:.3g}" for measure, value in row["measures"].items()))
        lines += [f"- {_cell(line)}" for line in _sides(model)]
        if model.unverified:
            lines.append(f"- **not verified**: {_cell(model.unverified)}")
        for cassette, drift in model.drifted[:limit]:
            what = f", {drift.what}" if drift.what else ""
            lines.append(f"- {drift.kind.value}: `{cassette}` {_cell(repr(drift.key[:80]))}: {drift.change:.2g}{_cell(what)}")
        if len(model.drifted) > limit:
            lines.append(f"- … and {len(model.drifted) - limit} more drifted entries (the JSON report lists all)")
    for path in report.written:
        lines.append(f"\nAccepted into `{path}`.")
    return "\n".join(lines) + "\n"


def write(report: DriftReport, paths: Iterable, step_summary: str | None) -> None:
    """Each path as Markdown (``.md``) or JSON; the Markdown appended to a CI job summary if one is given."""
    for path in map(Path, paths):
        if path.suffix == ".md":
            path.write_text(markdown(report), encoding="utf-8")
        else:
            path.write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as summary:
            summary.write(markdown(report))
