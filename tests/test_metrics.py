"""Metric functions on cases with known answers."""

import math

import pytest

from dsunlearn.eval.metrics import accuracy, lcs_length, rouge_l, rouge_l_recall, words


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
