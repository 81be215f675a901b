"""Membership-inference suite: LOSS, zlib, min-k% and min-k%++ scores of the forget items
(members: trained on) against never-seen items of the same distribution (non-members), each as
ROC AUC and as TPR at a low FPR (the math: `eval/mia.py`).

The pairing is the benchmark's own (`eval/benchmarks/builtin.py`): the forget people's training
VQA pairs on their training pictures against the same pairs on their held-out pictures, so only
whether the picture was seen differs. A model that removed the faces scores like gold.
"""

from __future__ import annotations

from typing import Any

import torch

from dsunlearn.audit.context import AuditContext, Source
from dsunlearn.eval.mia import (
    auc,
    loss_score,
    min_k_percent,
    min_k_plus_plus,
    tpr_at_fpr,
    zlib_score,
)
from dsunlearn.eval.scoring import map_answer_rows
from dsunlearn.models.lm_head import TeacherForced

STATISTICS = ("loss", "zlib", "mink", "minkpp")


def item_scores(
    ctx: AuditContext, model: Any, processor: Any, items: list[Any]
) -> dict[str, list[float]]:
    """Every statistic of every item (higher = more likely a member), in item order."""
    k = ctx.cfg.mia_k

    def fn(tf: TeacherForced, rows: list[int]) -> list[list[float]]:
        mu, sigma = tf.token_moments()  # first: one sweep gives the log-probs too
        lp, mask = tf.token_logprobs()
        lp, mask, mu, sigma = lp.cpu(), mask.cpu(), mu.cpu(), sigma.cpu()
        texts = [items[i].answer for i in rows]
        columns = (
            loss_score(lp, mask),
            zlib_score(lp, mask, texts),
            min_k_percent(lp, mask, k),
            min_k_plus_plus(lp, mu, sigma, mask, k),
        )
        return torch.stack(columns, dim=1).tolist()

    answers = [it.answer for it in items]
    rows = map_answer_rows(model, processor, items, answers, ctx.per_rank, ctx.info, fn)
    return {name: [r[j] for r in rows] for j, name in enumerate(STATISTICS)}


def membership_suite(ctx: AuditContext, source: Source) -> dict[str, Any]:
    """{statistic: {"auc": ..., "tpr_at_fpr": ...}, "fpr": ..., "members": n, "nonmembers": n}."""
    sets = ctx.sets.mia
    with ctx.frozen(source) as (model, processor):
        pos = item_scores(ctx, model, processor, sets.members)
        neg = item_scores(ctx, model, processor, sets.nonmembers)
    out: dict[str, Any] = {
        "fpr": ctx.cfg.mia_fpr,
        "members": len(sets.members),
        "nonmembers": len(sets.nonmembers),
    }
    for name in STATISTICS:
        out[name] = {
            "auc": auc(pos[name], neg[name]),
            "tpr_at_fpr": tpr_at_fpr(pos[name], neg[name], ctx.cfg.mia_fpr),
        }
    return out
