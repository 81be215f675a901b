"""Plain metric functions with no model in them, so they can be tested on known answers."""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN_RE = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation is ignored for text-overlap metrics."""
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)*len(b)) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two strings on lower-cased word tokens (0 when either is empty)."""
    p, r = words(prediction), words(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Share of the reference's words recovered in order (MMUBench's MIA metric)."""
    r = words(reference)
    return lcs_length(words(prediction), r) / len(r) if r else 0.0


def accuracy(correct: Sequence[bool]) -> float:
    return sum(map(bool, correct)) / len(correct) if correct else float("nan")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
