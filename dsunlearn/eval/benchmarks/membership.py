"""Loss-based membership inference shared by every protocol: min-k% (k = 20) token
log-probability of an answer, and the ROC AUC telling *members* (items the model was trained
on) from *non-members* (items of the same distribution it never saw). 0.5 = the forget items
no longer stand out. Each benchmark pairs members and non-members its own way (its module says
how); the math is in `eval/mia.py`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsunlearn.config import EvalConfig
from dsunlearn.data.examples import QAExample, subsample
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.evaluate import per_rank_batch
from dsunlearn.eval.mia import auc, min_k_percent
from dsunlearn.eval.scoring import eval_mode, map_answer_rows
from dsunlearn.models.lm_head import TeacherForced

MINK_K = 20.0


@dataclass
class MiaSets:
    members: list[QAExample]
    nonmembers: list[QAExample]

    def facts(self, key: str) -> dict[str, Any]:
        """What the report says about this membership inference: its key, k and set sizes."""
        return {
            "key": key,
            "k_pct": MINK_K,
            "members": len(self.members),
            "nonmembers": len(self.nonmembers),
        }


def capped(
    members: list[QAExample], nonmembers: list[QAExample], cfg: EvalConfig, seed: int
) -> MiaSets:
    """Each side capped at `cfg.max_items`, by its own seed."""
    return MiaSets(
        members=subsample(members, cfg.max_items, seed),
        nonmembers=subsample(nonmembers, cfg.max_items, seed + 1),
    )


def min_k_scores(
    model: Any,
    processor: Any,
    items: Sequence[QAExample],
    per_rank: int,
    info: DistInfo,
    k: float = MINK_K,
) -> list[float]:
    """Min-k% token log-probability of each item's answer (higher = more likely a member)."""

    def fn(tf: TeacherForced, _rows: list[int]) -> list[float]:
        lp, mask = tf.token_logprobs()
        return min_k_percent(lp.cpu(), mask.cpu(), k).tolist()

    return map_answer_rows(model, processor, items, [it.answer for it in items], per_rank, info, fn)


def mia_mink_auc(
    model: Any, processor: Any, sets: MiaSets | None, cfg: EvalConfig, info: DistInfo, key: str
) -> dict[str, float]:
    """{key: AUC}; {} without sets or when either side is empty (e.g. no held-out pictures)."""
    if sets is None or not sets.members or not sets.nonmembers:
        return {}
    with eval_mode(model):
        per_rank = per_rank_batch(cfg, info)
        pos = min_k_scores(model, processor, sets.members, per_rank, info)
        neg = min_k_scores(model, processor, sets.nonmembers, per_rank, info)
    return {key: auc(pos, neg)}
