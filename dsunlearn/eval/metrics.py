"""Plain metric functions with no model in them, so they can be tested on known answers."""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------
# SIU / MMUBench metrics on the identity probes ("who is this?" about a forget entity's picture)
# ---------------------------------------------------------------------------------------------


def names_entity(answer: str, name: str) -> bool:
    """True when any word of `name` occurs in `answer` as a whole word, case-insensitively.

    Words are `words()` tokens, so "Jorna," names Jorna but "Jornas" does not.
    """
    return not set(words(name)).isdisjoint(words(answer))


def distinct_ratio(answer: str) -> float:
    """Unique words / words of one answer (MMUBench's DIV per answer); 0 for an empty answer."""
    w = words(answer)
    return len(set(w)) / len(w) if w else 0.0


def probe_metrics(
    answers: Sequence[str], names: Sequence[str], splits: Sequence[str]
) -> dict[str, float]:
    """EFF, GEN and DIV of the identity-probe answers (one name and split per answer).

    eff: share of "train"-image answers that do not name the entity; gen: the same on "heldout"
    images; div: mean distinct-word ratio over every answer. A metric without answers is left out.
    """
    if not len(answers) == len(names) == len(splits):
        raise ValueError(
            f"probe columns differ in length: {len(answers)} answers, {len(names)} names, "
            f"{len(splits)} splits"
        )
    out: dict[str, float] = {}
    for metric, split in (("eff", "train"), ("gen", "heldout")):
        kept = [
            not names_entity(a, n)
            for a, n, s in zip(answers, names, splits, strict=True)
            if s == split
        ]
        if kept:
            out[metric] = accuracy(kept)
    if answers:
        out["div"] = mean([distinct_ratio(a) for a in answers])
    return out


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp(total NLL / scored tokens); nan when no token was scored."""
    if tokens <= 0:
        return float("nan")
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf
