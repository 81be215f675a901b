"""Verdicts against the gold model: truth ratios, forget quality and gaps.

The gold model was trained like the vanilla one without ever seeing a forget person's picture
(`dsunlearn learn gold=true`): it is what a perfect visual unlearning would give.

- **Truth ratio** of a multiple-choice item (TOFU, Maini et al. 2024, with the wrong options in
  the part of TOFU's perturbed answers and the right option in that of its paraphrased answer):
  `R = mean_{w in wrong} P(w|q)^(1/|w|) / P(a|q)^(1/|a|)`, each probability length-normalised
  by its number of answer tokens. `P(x|q)^(1/|x|)` is `exp` of the option's mean token
  log-likelihood, the score multiple choice already ranks options by, so
  `R = mean_w exp(s_w - s_a)`. R near 1 (or above): the model cannot tell the right answer
  from the wrong ones; R near 0: it knows the answer.
- **Forget quality**: the p-value of the two-sample Kolmogorov-Smirnov test
  (`scipy.stats.ks_2samp`, two-sided) between a model's and the gold model's truth ratios over
  the same forget items. High (> 0.05): the two distributions cannot be told apart. It depends
  on the number of items, which is reported as `n`.
- **Gap to gold**: metric minus gold's, for every metric both rows have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LOG_R_MAX = 700.0  # exp(700) ~ 1e304 stays a finite float (and valid JSON)


def truth_ratio(option_scores: Sequence[float], answer_index: int) -> float:
    """TOFU's truth ratio of one item from its options' mean token log-likelihoods."""
    if len(option_scores) < 2:
        raise ValueError("a truth ratio needs at least one wrong option")
    right = option_scores[answer_index]
    wrong = np.array([s for i, s in enumerate(option_scores) if i != answer_index], np.float64)
    # log mean exp(s_w - s_a), computed without overflow; R is capped at e^LOG_R_MAX (a right
    # option hundreds of nats less likely per token than the wrong ones: absurd, but finite)
    d = wrong - right
    top = float(d.max())
    return math.exp(min(LOG_R_MAX, top + math.log(float(np.exp(d - top).mean()))))


def truth_ratios(scores: Sequence[Sequence[float]], items: Sequence[Any]) -> list[float]:
    """Truth ratio of every item (`items[i].answer_index` is right) from its option scores."""
    return [truth_ratio(s, it.answer_index) for s, it in zip(scores, items, strict=True)]


def forget_quality(ratios: Sequence[float], gold_ratios: Sequence[float]) -> dict[str, float]:
    """KS-test p-value between a model's and the gold model's truth ratios, with the test's
    statistic, the item counts and both medians; {} when either side has no item."""
    from scipy.stats import ks_2samp

    if not ratios or not gold_ratios:
        return {}
    test = ks_2samp(np.asarray(ratios, np.float64), np.asarray(gold_ratios, np.float64))
    return {
        "p_value": float(test.pvalue),
        "ks_statistic": float(test.statistic),
        "n": len(ratios),
        "n_gold": len(gold_ratios),
        "median_truth_ratio": float(np.median(ratios)),
        "gold_median_truth_ratio": float(np.median(gold_ratios)),
    }


def gaps(metrics: Mapping[str, float], gold: Mapping[str, float]) -> dict[str, float]:
    """`metrics[k] - gold[k]` for every metric both have."""
    return {k: float(v) - float(gold[k]) for k, v in metrics.items() if k in gold}


def versus_gold(rows: Mapping[str, Any], gold: Any) -> dict[str, dict[str, Any]]:
    """Per row (a name -> `Scored`): its forget quality against `gold` (a `Scored`) and its gap
    to gold on every metric. Rows without truth ratios get no forget quality."""
    out: dict[str, dict[str, Any]] = {}
    for name, row in rows.items():
        verdict: dict[str, Any] = {"gap": gaps(row.metrics, gold.metrics)}
        quality = forget_quality(row.truth_ratios, gold.truth_ratios)
        if quality:
            verdict["forget_quality"] = quality
        out[name] = verdict
    return out
