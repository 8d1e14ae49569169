"""The parts of --ml-affected on their own: sources and their blocks, import closures, the record,
what the summary says changed, ``--ml-affected PATH``. The runs themselves: test_affected_runs.py;
the edit set: test_affected_edits.py."""

from __future__ import annotations

import textwrap
import types

import pytest

from ml_fixtures.affected.changes import Now, reasons
from ml_fixtures.affected.context import Context
from ml_fixtures.affected.fingerprints import Fingerprints
from ml_fixtures.affected.record import Dependencies, DependencyRecord, FileState, Snapshot, SourceState, TestRecord
from ml_fixtures.affected.sources import MODULE, Source, import_closure

BEFORE = '''
    """A module."""
    import functools

    LIMIT = 3


    def plain(x):
        """Doubles."""
        return 2 * x


    @functools.cache
    def table():
        return {"a": 1}


    class Service:
        size = 1

        def run(self, x):
            def inner():
                return x + 1
            return inner()
'''


def parse(source: str) -> Source:
    return Source.parse(textwrap.dedent(source))


def changed(before: str, after: str) -> set[str]:
    old, new = parse(before).blocks, parse(after).blocks
    return {name for name in old.keys() | new.keys() if old.get(name) != new.get(name)}


def test_blocks_are_functions_and_methods_the_rest_is_the_module():
    source = parse(BEFORE)
    assert set(source.blocks) == {"plain", "Service.run", MODULE}  # the cached function is module state
    lines = textwrap.dedent(BEFORE).splitlines()
    assert source.block_at(lines.index("    return 2 * x") + 1) == "plain"
    assert source.block_at(lines.index("            return x + 1") + 1) == "Service.run"  # a nested function: its block
    assert source.block_at(lines.index('    return {"a": 1}') + 1) == MODULE
    assert source.block_at(lines.index("LIMIT = 3") + 1) == MODULE


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('"""Doubles."""', '"""Twice the value."""', set()),  # a docstring
        ("return 2 * x", "return 2 * x  # twice", set()),  # a comment
        ("LIMIT = 3\n", "LIMIT = 3\n\n\n", set()),  # layout
        ("return 2 * x", "return 3 * x", {"plain"}),
        ("return x + 1", "return x + 2", {"Service.run"}),  # inside a nested function
        ("LIMIT = 3", "LIMIT = 4", {MODULE}),
        ("size = 1", "size = 2", {MODULE}),  # a class attribute
        ('{"a": 1}', '{"a": 2}', {MODULE}),  # a cached function: every later caller has its result
        ("def plain(x):", "def plain(x, y=0):", {MODULE, "plain"}),  # a signature
    ],
)
def test_what_a_change_changes(old, new, expected):
    assert changed(BEFORE, BEFORE.replace(old, new)) == expected


def test_the_import_closure_follows_every_import_in_the_repository(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("import os\n\ndef f():\n    from .b import g\n    return g()\n")
    (package / "b.py").write_text("from pkg.c import h as g\n")
    (package / "c.py").write_text("h = 1\n")
    (package / "unused.py").write_text("")
    (tmp_path / "test_x.py").write_text("import pkg.a\nimport numpy\n")
    parsed = {}

    def read(path):
        return parsed.setdefault(path, Source.read(path, tmp_path))

    closure = import_closure(tmp_path / "test_x.py", [tmp_path], read)
    assert [p.relative_to(tmp_path).as_posix() for p in closure] == ["pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/c.py"]


def dependencies(**fields) -> Dependencies:
    return Dependencies(context="c1", **{name: frozenset(value) for name, value in fields.items()})


def test_the_record_keeps_each_test_with_shared_dependency_sets(tmp_path):
    record = DependencyRecord(tmp_path / "dependencies.sqlite")
    deps = dependencies(blocks={("a.py", "f", "d1")}, lookups={("m", "key", "x")})
    tests = [TestRecord(f"t.py::test_{i}", "passed", deps) for i in range(3)] + [TestRecord("t.py::gone", "failed", deps)]
    snapshot = Snapshot(tests=tests, sources={"a.py": SourceState(1, 2, {"f": "d1"})}, contexts={"c1": {"python": "3"}})
    record.write(snapshot)
    record.write(Snapshot(deleted=["t.py::gone"], outcomes={"t.py::test_0": "failed"}))
    outcomes = record.outcomes()
    assert sorted(outcomes) == ["t.py::test_0", "t.py::test_1", "t.py::test_2"]
    assert outcomes["t.py::test_0"][0] == "failed" and len({depset for _, depset in outcomes.values()}) == 1
    assert list(record.depsets().values()) == [deps] and record.contexts() == {"c1": {"python": "3"}}
    assert record.sources() == {"a.py": SourceState(1, 2, {"f": "d1"})}


class FakeNow(Now):
    def __init__(self, blocks, files=None, models=None, answers=None):
        super().__init__(None, {}, {}, lambda m: (models or {}).get(m), lambda m, k: (answers or {}).get((m, k), ""))
        self._blocks, self._files = blocks, files or {}

    def blocks(self, path):
        return self._blocks.get(path)

    def file(self, path):
        return self._files.get(path, "")


def test_reasons_name_what_changed():
    context = Context({"python": "3.11"})
    deps = Dependencies(
        context=context.digest,
        blocks=frozenset({("svc.py", "Service.run", "d1"), ("svc.py", "helper", "d2")}),
        modules=frozenset({("svc.py", "m1"), ("gone.py", "m2")}),
        data=frozenset({("data.json", "f1")}),
        models=frozenset({("BAAI/bge-m3", "recipe:1")}),
        lookups=frozenset({("BAAI/bge-m3", "a text", "x1"), ("BAAI/bge-m3", "another", "x2")}),
    )
    same = FakeNow(
        {"svc.py": {"Service.run": "d1", "helper": "d2", MODULE: "m1"}, "gone.py": {MODULE: "m2"}},
        {"data.json": "f1"}, {"BAAI/bge-m3": "recipe:1"}, {("BAAI/bge-m3", "a text"): "x1", ("BAAI/bge-m3", "another"): "x2"},
    )  # fmt: skip
    assert reasons(deps, same, context, {}) == []
    answers = {("BAAI/bge-m3", "a text"): "CHANGED", ("BAAI/bge-m3", "another"): "x2"}
    blocks = {"svc.py": {"Service.run": "CHANGED", "helper": "d2", MODULE: "m1"}}
    now = FakeNow(blocks, {"data.json": "CHANGED"}, {"BAAI/bge-m3": "recipe:2"}, answers)
    found = reasons(deps, now, context, {})
    assert [r.line for r in found] == [
        "gone.py changed (gone)",
        "svc.py changed (Service.run)",
        "data.json changed",
        "model BAAI/bge-m3 changed",
        "cassette entries of BAAI/bge-m3 changed",
    ]
    assert found[-1].entries == {("BAAI/bge-m3", "a text")}


def test_the_run_wide_context_says_what_changed():
    before = {"python": "3.11.7", "packages": '["torch-2.13.0"]', "file:conftest.py": "a", "file:x/conftest.py": "b"}
    now = Context({"python": "3.11.7", "packages": '["torch-2.14.1"]', "file:conftest.py": "c", "file:new/conftest.py": "d"})
    assert now.differences(before) == [
        "packages changed: removed torch-2.13.0; installed torch-2.14.1",
        "conftest.py changed (and 2 more files every test depends on)",
    ]
    assert Context(before).differences(before) == []


def test_a_path_after_ml_affected_is_a_path_and_a_revision_is_a_revision(ml_tree):
    ml_tree.write("unit/test_x.py", "def test_x():\n    pass\n")
    config = ml_tree.pytester.parseconfig("--ml-affected", "unit")
    from ml_fixtures.options import take_back_a_path

    take_back_a_path(config)
    assert config.option.ml_affected == "last" and config.args[-1] == "unit"
    config = ml_tree.pytester.parseconfig("--ml-affected", "origin/main")
    take_back_a_path(config)
    assert config.option.ml_affected == "origin/main"
    config = ml_tree.pytester.parseconfig("--ml-affected=unit")  # written as one word: a revision, whatever it looks like
    take_back_a_path(config)
    assert config.option.ml_affected == "unit"


def test_a_file_state_is_its_content(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{}")
    first = FileState.of(path)
    path.write_text("[]")
    assert FileState.of(path).digest != first.digest and FileState.of(tmp_path / "missing") is None


def test_a_remembered_fingerprint_holds_until_its_inputs_or_the_resolution_variables_change(tmp_path, monkeypatch):
    data, computed = tmp_path / "dataset.json", []
    data.write_text("[1]")

    def compute(spec):
        computed.append(spec.model_name)
        return "fp:" + data.read_text()

    spec = types.SimpleNamespace(model_name="m")
    first = Fingerprints(compute, dict)
    assert first(spec) == "fp:[1]"
    memo = dict(first.remembered)

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # what importing torch sets
    assert Fingerprints(compute, lambda: memo)(spec) == "fp:[1]" and computed == ["m"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert Fingerprints(compute, lambda: memo)(spec) == "fp:[1]" and computed == ["m", "m"]
    monkeypatch.delenv("HF_HOME")
    data.write_text("[2]")
    assert Fingerprints(compute, lambda: memo)(spec) == "fp:[2]" and computed == ["m", "m", "m"]
