"""The comparisons of --ml-record=verify (drift.py) on outputs made up here: what is noise, numeric drift, a decision."""

import json
import math

import pytest

from ml_fixtures.drift import EntryDrift, Kind, Logits, Numeric, Scores, SparseWeights, softmax
from ml_fixtures.keys import cassette_key, input_of_key


def one(comparison, recorded, live) -> EntryDrift:
    (drift,) = comparison.compare({"text": recorded}, {"text": live})
    return drift


class TestSparseWeights:
    WEIGHTS = {"glacier": 0.31, "melting": 0.22, "the": 0.004}

    def test_the_same_weights_are_noise_with_no_change(self):
        drift = one(SparseWeights(), self.WEIGHTS, dict(self.WEIGHTS))
        assert (drift.kind, drift.change, drift.measures["jaccard"]) == (Kind.NOISE, 0.0, 1.0)

    def test_a_change_within_tolerance_is_noise_and_beyond_it_numeric(self):
        assert one(SparseWeights(), self.WEIGHTS, {**self.WEIGHTS, "glacier": 0.3109}).kind is Kind.NOISE
        drift = one(SparseWeights(), self.WEIGHTS, {**self.WEIGHTS, "glacier": 0.32})
        assert drift.kind is Kind.NUMERIC and drift.change == pytest.approx(0.01)

    def test_a_term_lost_or_gained_is_a_decision_named_in_words(self):
        lost = one(SparseWeights(), self.WEIGHTS, {"glacier": 0.31, "the": 0.004})
        assert (lost.kind, lost.what, lost.measures["jaccard"]) == (Kind.DECISION, "lost melting", 0.5)
        gained = one(SparseWeights(), self.WEIGHTS, {**self.WEIGHTS, "ice": 0.05})
        assert (gained.kind, gained.what) == (Kind.DECISION, "gained ice")

    def test_a_term_hovering_at_the_pruning_threshold_is_no_decision(self):
        """'the' weighs less than the margin on both sides: dropped by the model (weight 0), it is not a term-set change."""
        drift = one(SparseWeights(), self.WEIGHTS, {"glacier": 0.31, "melting": 0.22})
        assert drift.kind is Kind.NUMERIC and drift.change == pytest.approx(0.004) and drift.measures["jaccard"] == 1.0
        assert one(SparseWeights(atol=0.005), self.WEIGHTS, {"glacier": 0.31, "melting": 0.22}).kind is Kind.NOISE

    def test_noise_within_tolerance_never_reads_as_a_decision(self):
        """With the margin above the tolerance, a term can only appear or vanish by a change beyond tolerance."""
        comparison = SparseWeights()
        for weight in (0.0, 0.0005, 0.0099, 0.01, 0.0105):
            for live in (weight - comparison.atol, weight + comparison.atol):
                drift = one(comparison, {"a": weight} if weight else {}, {"a": live} if live > 0 else {})
                assert drift.kind is not Kind.DECISION, (weight, live)

    def test_a_lower_min_jaccard_allows_a_term_to_go(self):
        drift = one(SparseWeights(min_jaccard=0.5), self.WEIGHTS, {"glacier": 0.31, "the": 0.004})
        assert drift.kind is Kind.NUMERIC and drift.what == "lost melting"


class TestLogits:
    RECORDED = {"cooking": 3.0, "finance": -1.0, "travel": 0.5}

    def test_a_small_move_is_noise_and_a_larger_one_numeric(self):
        assert one(Logits(), self.RECORDED, {**self.RECORDED, "finance": -1.001}).kind is Kind.NOISE
        drift = one(Logits(), self.RECORDED, {**self.RECORDED, "finance": -0.8})
        expected = max(abs(a - b) for a, b in zip(softmax([3.0, -1.0, 0.5]), softmax([3.0, -0.8, 0.5])))
        assert drift.kind is Kind.NUMERIC and drift.change == pytest.approx(expected)
        assert drift.measures["logit change"] == pytest.approx(0.2)

    def test_a_flipped_label_is_a_decision(self):
        drift = one(Logits(), self.RECORDED, {**self.RECORDED, "travel": 3.5})
        assert (drift.kind, drift.what) == (Kind.DECISION, "label cooking -> travel")

    def test_a_flip_between_labels_the_recording_tied_is_a_near_tie_not_a_decision(self):
        recorded = {"cooking": 1.0, "travel": 0.9999}
        drift = one(Logits(), recorded, {"cooking": 0.9999, "travel": 1.0})
        assert drift.kind is Kind.NOISE and drift.what.startswith("near tie: label cooking -> travel")

    def test_another_label_set_is_a_decision(self):
        drift = one(Logits(), self.RECORDED, {"cooking": 3.0, "finance": -1.0, "sports": 0.5})
        assert drift.kind is Kind.DECISION and "labels changed" in drift.what


def pair(query: str, text: str) -> str:
    return cassette_key((query, text))


class TestScores:
    RECORDED = {pair("q", "best"): 4.0, pair("q", "good"): 1.0, pair("q", "bad"): -3.0, pair("r", "only"): 0.5}

    def test_per_query_scores_within_tolerance_are_noise(self):
        live = {key: score + 0.005 for key, score in self.RECORDED.items()}
        drifts = Scores().compare(self.RECORDED, live)
        assert {d.kind for d in drifts} == {Kind.NOISE} and {d.group for d in drifts} == {"q", "r"}
        summary = Scores().summary(drifts)
        assert (summary["queries"], summary["top-1 agreement"], summary["min tau"]) == (2, 1.0, 1.0)

    def test_a_swap_of_clearly_ordered_texts_is_a_decision_of_both_entries(self):
        live = {**self.RECORDED, pair("q", "good"): -3.5}
        drifts = {d.key: d for d in Scores().compare(self.RECORDED, live)}
        assert drifts[pair("q", "good")].kind is drifts[pair("q", "bad")].kind is Kind.DECISION
        assert drifts[pair("q", "bad")].change == 0.0, "a decision entry though its own score did not move"
        assert drifts[pair("q", "best")].kind is Kind.NOISE and drifts[pair("r", "only")].kind is Kind.NOISE
        assert drifts[pair("q", "good")].measures["tau"] == pytest.approx(1 / 3)

    def test_a_swap_of_texts_the_recording_tied_is_no_decision(self):
        recorded = {pair("q", "a"): 1.0, pair("q", "b"): 1.001}
        live = {pair("q", "a"): 1.002, pair("q", "b"): 1.0}
        assert {d.kind for d in Scores().compare(recorded, live)} == {Kind.NOISE}

    def test_a_lower_min_tau_allows_swaps_below_the_top_but_not_a_new_top(self):
        below = {**self.RECORDED, pair("q", "good"): -3.5}
        assert {d.kind for d in Scores(min_tau=0.0).compare(self.RECORDED, below)} == {Kind.NUMERIC, Kind.NOISE}
        top = {**self.RECORDED, pair("q", "good"): 4.5}
        drifts = Scores(min_tau=-1.0).compare(self.RECORDED, top)
        assert {d.key for d in drifts if d.kind is Kind.DECISION} == {pair("q", "best"), pair("q", "good")}
        assert Scores().summary(drifts)["top-1 agreement"] == 0.5

    def test_a_reversed_order_is_a_decision_everywhere(self):
        live = {key: -score for key, score in self.RECORDED.items()}
        drifts = Scores().compare(self.RECORDED, live)
        assert [d.kind for d in drifts] == [Kind.DECISION] * 3 + [Kind.NUMERIC]
        assert drifts[0].what.startswith("top-1 changed")


def test_numeric_compares_any_output_and_a_changed_structure_is_a_decision():
    assert one(Numeric(), {"a": [1.0, 2.0]}, {"a": [1.00001, 2.0]}).kind is Kind.NOISE
    assert one(Numeric(), {"a": [1.0, 2.0]}, {"a": [1.1, 2.0]}).kind is Kind.NUMERIC
    assert one(Numeric(), {"a": [1.0, 2.0]}, {"a": [1.0]}).kind is Kind.DECISION
    assert one(Numeric(), {"a": "x"}, {"a": "y"}).kind is Kind.DECISION


def test_decisions_are_worse_than_any_numeric_drift():
    decision = EntryDrift("a", Kind.DECISION, 0.0, 1e-3)
    numeric = EntryDrift("b", Kind.NUMERIC, 10.0, 1e-3)
    assert max([numeric, decision], key=lambda d: d.severity) is decision
    assert EntryDrift("c", Kind.NOISE, 0.0, 0.0).severity == (0, 0.0)
    assert EntryDrift("c", Kind.NUMERIC, 1.0, 0.0).severity == (1, math.inf)


@pytest.mark.parametrize("call_input", ["a text", ("a query", "a text"), ("é", "ü"), "[not json", '["a", 1]'])
def test_a_cassette_key_reads_back_as_its_input(call_input):
    assert input_of_key(cassette_key(call_input)) == call_input


def test_the_declared_settings_are_reported():
    assert Scores(atol=0.5).declared() == {"comparison": "Scores", "atol": 0.5, "tie": None, "min_tau": 1.0}
    assert json.dumps(SparseWeights().declared())
