"""Verdicts against the gold model (eval/verdict.py): truth ratio, forget quality, gaps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from dsunlearn.eval.benchmarks.base import Scored
from dsunlearn.eval.verdict import forget_quality, gaps, truth_ratio, truth_ratios, versus_gold


def test_truth_ratio_hand_computed():
    # mean token log-likelihoods: right option -1.0, wrong -2.0 and -3.0
    scores = [-2.0, -1.0, -3.0]
    expected = (math.exp(-2.0) + math.exp(-3.0)) / 2 / math.exp(-1.0)
    assert truth_ratio(scores, 1) == pytest.approx(expected, rel=1e-12)
    # a model that cannot tell right from wrong: R = 1; one that knows: R -> 0
    assert truth_ratio([-1.5, -1.5, -1.5, -1.5], 2) == pytest.approx(1.0)
    assert truth_ratio([-40.0, -0.01, -40.0, -40.0], 1) < 1e-15
    # no overflow for huge gaps in either direction
    assert truth_ratio([-1000.0, 0.0], 1) == 0.0
    assert truth_ratio([0.0, -600.0], 1) == pytest.approx(math.exp(600.0), rel=1e-9)
    assert truth_ratio([0.0, -800.0], 1) == math.exp(700.0)  # capped: finite, JSON-safe
    with pytest.raises(ValueError):
        truth_ratio([-1.0], 0)


def test_truth_ratios_follow_each_items_answer():
    items = [SimpleNamespace(answer_index=0), SimpleNamespace(answer_index=1)]
    got = truth_ratios([[-1.0, -2.0], [-1.0, -2.0]], items)
    assert got == pytest.approx([math.exp(-1.0), math.exp(1.0)])


def test_forget_quality_is_the_ks_p_value():
    from scipy.stats import ks_2samp

    gold = [0.9, 1.1, 1.0, 0.95, 1.05, 0.8, 1.2, 1.0]
    same = forget_quality(gold, gold)
    assert same["p_value"] == pytest.approx(1.0) and same["ks_statistic"] == 0.0
    assert same["n"] == same["n_gold"] == 8
    knows = [1e-3, 2e-3, 1e-4, 5e-3, 1e-3, 2e-4, 3e-3, 1e-3]  # a model that still knows
    q = forget_quality(knows, gold)
    assert q["p_value"] == pytest.approx(ks_2samp(knows, gold).pvalue)
    assert q["p_value"] < 0.01 and q["ks_statistic"] == 1.0
    assert q["median_truth_ratio"] < q["gold_median_truth_ratio"]
    assert forget_quality([], gold) == {}


def test_gaps_and_versus_gold():
    assert gaps({"a": 0.5, "b": 1.0}, {"a": 0.25, "c": 3.0}) == {"a": 0.25}
    gold = Scored({"acc": 0.25}, [1.0, 0.9, 1.1])
    rows = {"m": Scored({"acc": 0.75}, [0.01, 0.02, 0.03]), "n": Scored({"acc": 0.3})}
    out = versus_gold(rows, gold)
    assert out["m"]["gap"] == {"acc": 0.5} and out["m"]["forget_quality"]["n"] == 3
    assert "forget_quality" not in out["n"]  # no truth ratios: no forget quality
