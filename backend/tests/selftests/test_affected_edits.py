"""--ml-affected misses nothing on the edit set (``edit_set.py``): for each kind of edit, every test
that fails in a full run is among the tests selected, and where an edit can only affect a few tests
(a docstring, one test, a new test) only those are selected. Real processes on a scratch repository,
through one warm server (each run imports the scratch's application afresh)."""

from __future__ import annotations

import pytest

from ml_fixtures.warm import lifecycle
from selftests import edit_set
from selftests.edit_set import Scratch

pytestmark = pytest.mark.slow  # real processes: `make test-slow` (pytest.ini)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    base = tmp_path_factory.mktemp("edit-set")
    tree = Scratch(base / "repo", base / "warm")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ML_WARM_DIR", str(base / "warm"))
        try:
            baseline = tree.run()
            passed = f"{len(edit_set.ALL_TESTS)} passed"
            assert baseline.returncode == 0 and passed in baseline.stdout, baseline.stdout + baseline.stderr
            yield tree
        finally:
            lifecycle.stop()


def test_nothing_changed_selects_nothing(scratch):
    done = scratch.run("--ml-affected")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ml-affected: nothing to run: no dependency of the {len(edit_set.ALL_TESTS)} tests changed" in done.stdout


@pytest.mark.parametrize("edit", edit_set.EDITS, ids=lambda edit: edit.kind)
def test_every_failing_test_is_selected(scratch, edit):
    edit.apply(scratch.root)
    try:
        selected, output = scratch.selected()
        failing = scratch.failing()
        since_head, _ = scratch.selected("--ml-affected=HEAD")  # the record was made at HEAD
    finally:
        edit_set.undo(scratch.root)
    assert bool(failing) == edit.breaks, f"{edit.kind}: failing in a full run: {sorted(failing)}"
    assert failing <= selected, f"{edit.kind}: missed {sorted(failing - selected)}\n{output}"
    assert selected <= since_head
    if edit.selects_at_most is not None:
        assert selected <= edit.selects_at_most, f"{edit.kind}: selected {sorted(selected)}\n{output}"
