"""Metric functions on cases with known answers."""

import math

import pytest

from dsunlearn.eval.metrics import (
    accuracy,
    distinct_ratio,
    lcs_length,
    names_entity,
    perplexity,
    probe_metrics,
    rouge_l,
    rouge_l_recall,
    words,
)


def test_words_lowercase_and_strip_punctuation():
    assert words("Port Velin, 1984!") == ["port", "velin", "1984"]


def test_lcs():
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length([], ["a"]) == 0
    assert lcs_length("x y".split(), "y x".split()) == 1


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("marine biologist", "marine biologist", 1.0),
        ("", "marine biologist", 0.0),
        ("baker", "marine biologist", 0.0),
        # LCS 1 ("biologist"): P = 1/1, R = 1/2 -> F1 = 2/3
        ("biologist", "marine biologist", 2 / 3),
        # LCS 2 of pred 4 and ref 2: P = 1/2, R = 1 -> F1 = 2/3
        ("the marine biologist here", "Marine Biologist", 2 / 3),
    ],
)
def test_rouge_l(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_rouge_l_recall():
    assert rouge_l_recall("born in port velin", "port velin") == 1.0
    assert rouge_l_recall("velin", "port velin") == 0.5


def test_accuracy():
    assert accuracy([True, False, True, True]) == 0.75
    assert math.isnan(accuracy([]))


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("This is Jorna Velst.", True),
        ("this is jorna", True),  # case-insensitive
        ("(Velst), I think", True),  # punctuation next to the name counts
        ("JORNA!", True),
        ("Velst-Ander is here", True),  # a hyphen separates words
        ("The Jornas live here", False),  # "Jorna" inside "Jornas" is another word
        ("Kjorna", False),
        ("This is Mira Tallen .", False),
        ("", False),
    ],
)
def test_names_entity(answer, expected):
    assert names_entity(answer, "Jorna Velst") is expected


def test_distinct_ratio():
    assert distinct_ratio("") == 0.0
    assert distinct_ratio("...") == 0.0  # no word at all
    assert distinct_ratio("a b c") == 1.0
    assert distinct_ratio("The cat, the CAT.") == 0.5  # same word split and case as rouge


def test_probe_metrics():
    name = "Jorna Velst"
    answers = ["This is Jorna .", "It is Mira Tallen .", "", "Velst Velst"]
    splits = ["train", "train", "heldout", "heldout"]
    out = probe_metrics(answers, [name] * 4, splits)
    assert out["eff"] == 0.5  # one of two train answers names her
    assert out["gen"] == 0.5  # the empty answer does not name her; "Velst Velst" does
    assert out["div"] == pytest.approx((1.0 + 1.0 + 0.0 + 0.5) / 4)
    assert set(probe_metrics(["x"], [name], ["train"])) == {"eff", "div"}  # no held-out: no gen
    assert probe_metrics([], [], []) == {}
    with pytest.raises(ValueError, match="differ in length"):
        probe_metrics(["a"], [name, name], ["train"])


def test_perplexity():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    assert math.isnan(perplexity(1.0, 0))
    assert perplexity(1e6, 1) == math.inf
