"""In-run checkpoint selection rules (eval/selection.py), on hand-made validation curves."""

from __future__ import annotations

import pytest

from dsunlearn.config import SelectConfig
from dsunlearn.errors import ConfigError
from dsunlearn.eval.selection import Selector, Targets, score

T = Targets("forget", "retain", gold_forget=0.2, vanilla_retain=1.0)
# (step, forget, retain): forgetting goes down, and retain suffers late
CURVE = [(3, 0.9, 1.0), (6, 0.5, 0.99), (9, 0.24, 0.97), (12, 0.2, 0.96), (15, 0.1, 0.8)]


def run(criterion: str, curve=CURVE, patience: int = 0, targets=T) -> Selector:
    sel = Selector(SelectConfig(criterion=criterion), targets, patience)
    for step, f, r in curve:
        sel.observe(step, {"forget": f, "retain": r})
        if sel.should_stop:
            break
    return sel


def test_score_weighs_retain_kept_against_distance_to_gold():
    assert score({"forget": 0.2, "retain": 1.0}, T) == pytest.approx(1.0)
    assert score({"forget": 0.5, "retain": 0.9}, T) == pytest.approx(0.9 - 0.3)
    assert score({"forget": 0.0, "retain": 1.2}, T) == pytest.approx(1.0 - 0.2)  # capped at 1


def test_gold_first_takes_the_first_step_that_meets_both_targets():
    sel = run("gold_first")
    # step 9: forget 0.24 <= 0.2 + 0.05 and retain 0.97 >= 0.95: first to qualify, kept after
    assert sel.step == 9 and sel.qualified
    assert "first step with forget 0.240 <= gold 0.200 + 0.05" in sel.reason()
    assert sel.summary()["met_targets"] is True


def test_gold_first_without_a_qualifying_step_takes_the_best_score():
    never = [(s, f, r * 0.5) for s, f, r in CURVE]  # retain always below 0.95 x vanilla
    sel = run("gold_first", never)
    best = max(never, key=lambda p: (score({"forget": p[1], "retain": p[2]}, T), -p[0]))
    assert sel.step == best[0] and not sel.qualified
    assert sel.reason().startswith("no step met the targets; best score")


def test_best_score_and_last():
    assert run("best_score").step == 12  # forget exactly gold's, retain 0.96: score 0.96
    assert run("last").step == 15
    assert run("last", targets=None).step == 15  # a benchmark without retain metrics


def test_ties_go_to_the_earlier_step():
    flat = [(2, 0.2, 1.0), (4, 0.2, 1.0)]
    assert run("best_score", flat).step == 2


def test_patience_stops_after_k_evaluations_without_a_new_selection():
    sel = run("gold_first", patience=2)
    assert sel.step == 9 and sel.should_stop and sel.unchanged == 2  # stopped after step 15
    assert not run("gold_first", patience=0).should_stop


def test_state_round_trip_continues_identically():
    first = Selector(SelectConfig(), T, 2)
    for step, f, r in CURVE[:3]:
        first.observe(step, {"forget": f, "retain": r})
    again = Selector.from_state(SelectConfig(), T, 2, first.state())
    for step, f, r in CURVE[3:]:
        first.observe(step, {"forget": f, "retain": r})
        again.observe(step, {"forget": f, "retain": r})
    assert again.state() == first.state() and again.summary() == first.summary()


def test_bad_criteria_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown select.criterion 'best'"):
        Selector(SelectConfig(criterion="best"), T)
    with pytest.raises(ConfigError, match="use select.criterion=last"):
        Selector(SelectConfig(criterion="gold_first"), None)
