"""What a unit test pays for the library: nothing it does not use (issue 26's cuts, checked for behaviour)."""

import json

from ml_fixtures.cassettes import VERSION, Cassettes, Replay
from ml_fixtures.options import RecordMode, ReplayMode
from ml_models import SPARSE


def _cassettes(tmp_path, fingerprint: str, looked_up: list[str]) -> Cassettes:
    cassette = {"version": VERSION, "models": {SPARSE.model_name: {"fingerprint": "recipe:a", "calls": {"held": {"x": 0.5}}}}}
    (tmp_path / "test_module.json").write_text(json.dumps(cassette))

    def fingerprint_of(spec):
        looked_up.append(spec.model_name)
        return fingerprint

    return Cassettes(tmp_path, RecordMode.NONE, fingerprint_of=fingerprint_of)


def test_the_models_fingerprint_is_looked_up_only_for_an_input_a_cassette_holds(tmp_path):
    looked_up: list[str] = []
    cassettes = _cassettes(tmp_path, "recipe:a", looked_up)
    replay = Replay(cassettes.replay_index(SPARSE), ReplayMode.FALLBACK, SPARSE.model_name)
    assert replay.get("made up") is None and looked_up == []
    assert replay.get("held") == {"x": 0.5} and looked_up == [SPARSE.model_name]
    assert dict(cassettes.replay_index(SPARSE)) == {"held": {"x": 0.5}} and looked_up == [SPARSE.model_name]
    assert cassettes.stale((SPARSE,)) == []


def test_a_stale_cassette_is_still_not_replayed_and_is_reported(tmp_path):
    looked_up: list[str] = []
    cassettes = _cassettes(tmp_path, "recipe:b", looked_up)
    replay = Replay(cassettes.replay_index(SPARSE), ReplayMode.FALLBACK, SPARSE.model_name)
    assert replay.get("held") is None and looked_up == [SPARSE.model_name]
    assert cassettes.stale((SPARSE,)) == [f"test_module.json ({SPARSE.model_name})"]
