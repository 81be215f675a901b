"""Loss-based membership inference and MMUBench's C-Dis, as pure tensor functions.

Membership inference asks whether an item was in the training data. After unlearning, the
forget items should look like items the model never saw: the AUC of a member-vs-nonmember
score that separates them should fall to about 0.5.

The score is min-k% token probability (Shi et al. 2023, "Detecting Pretraining Data from Large
Language Models", arXiv 2310.16789): the mean of the k% lowest token log-probabilities of the
answer. Seen text has few very unlikely tokens, so a higher score means "more likely a member".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dsunlearn.models.encode import IGNORE_INDEX


def answer_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each labelled token [B, T-1] fp32, mask [B, T-1] bool) from logits [B, T, V]
    and labels [B, T] (IGNORE_INDEX = -100 outside the answer), shifted like the models:
    position t's logits predict label t+1 (as `encode._token_nll`). Unlabelled positions hold 0.

    Only labelled positions are upcast and normalised, as in `encode._token_nll`.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(logits.device)
    mask = shift_labels != IGNORE_INDEX
    picked = shift_logits[mask].float()
    lp = torch.log_softmax(picked, dim=-1).gather(-1, shift_labels[mask].unsqueeze(-1))
    out = torch.zeros(shift_labels.shape, dtype=torch.float32, device=logits.device)
    out[mask] = lp.squeeze(-1)
    return out, mask


def min_k_percent(
    token_logprobs: torch.Tensor, mask: torch.Tensor, k: float = 20.0
) -> torch.Tensor:
    """Min-k% Prob per row [N] fp32: the mean of the floor(k% of n) lowest log-probabilities
    among the row's n unmasked tokens, at least 1 token (a short answer keeps its least likely
    token; Shi et al.'s code takes int(n * k / 100) and would average nothing). nan for a row
    without unmasked tokens. k is a percentage in (0, 100]; k = 100 is the mean log-probability.
    """
    if not 0 < k <= 100:
        raise ValueError(f"k is a percentage in (0, 100], got {k}")
    if token_logprobs.shape != mask.shape or token_logprobs.dim() != 2:
        raise ValueError(
            f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} must be "
            "the same [N, T] shape"
        )
    mask = mask.bool()
    lp = token_logprobs.float().masked_fill(~mask, math.inf)
    ordered, _ = lp.sort(dim=1)  # masked positions (+inf) last
    n = mask.sum(dim=1)
    # the 1e-9 keeps float error from dropping a token: 20% of 5 is 1, not 0.999...
    m = torch.floor(n.double() * k / 100 + 1e-9).long().clamp(min=1)
    keep = torch.arange(lp.shape[1], device=lp.device).unsqueeze(0) < m.unsqueeze(1)
    sums = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(dim=1)
    out = sums / m.to(sums.dtype)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


def auc(
    member_scores: Sequence[float] | torch.Tensor, nonmember_scores: Sequence[float] | torch.Tensor
) -> float:
    """ROC AUC of telling members from nonmembers by score (higher = member): the probability
    that a random member outscores a random nonmember, ties counted one half (Mann-Whitney U /
    (n_member * n_nonmember)). 0.5 = indistinguishable; nan when either side is empty; a nan
    score raises (it would be silently ranked otherwise)."""
    pos = [float(x) for x in _as_list(member_scores)]
    neg = [float(x) for x in _as_list(nonmember_scores)]
    if any(math.isnan(x) for x in pos + neg):
        raise ValueError("scores contain nan")
    if not pos or not neg:
        return math.nan
    # Mid-ranks over the pooled scores; U = (sum of member ranks) - n_pos (n_pos + 1) / 2.
    pooled = sorted([(x, 1) for x in pos] + [(x, 0) for x in neg])
    rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        mid = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mid * sum(label for _, label in pooled[i:j])
        i = j
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def _as_list(x: Sequence[float] | torch.Tensor) -> list[float]:
    return x.detach().flatten().tolist() if isinstance(x, torch.Tensor) else list(x)


def concept_kl(
    ref_logits: torch.Tensor, logits: torch.Tensor, concept_ids: Sequence[int]
) -> torch.Tensor:
    """C-Dis per position [...] fp32: KL(p_ref || p) between the original (ref) and unlearned
    next-token distributions [..., V], coarsened to the concept's token ids plus one bucket
    for every other token.

    The papers README ("MMUBench metrics") defines C-Dis only as "the KL between original and
    unlearned probabilities of a few concept-related tokens". The coarsening makes that a true
    KL: >= 0, 0 exactly when every concept token keeps its probability, and at most the full
    KL (data processing). With one concept token it is the KL between Bernoulli(p_ref(c)) and
    Bernoulli(p(c)). The direction is the DMK loss's, KL(p_ref || p). Higher = farther from
    the original on the concept. Duplicate ids count once.
    """
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits {tuple(ref_logits.shape)} != logits {tuple(logits.shape)}")
    ids = sorted(set(int(i) for i in concept_ids))
    if not ids:
        raise ValueError("concept_ids is empty")
    vocab = logits.shape[-1]
    if ids[0] < 0 or ids[-1] >= vocab:
        raise ValueError(f"concept ids must lie in [0, {vocab}), got {ids}")
    index = torch.tensor(ids, device=logits.device)

    def coarse(x: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(x.float(), dim=-1).index_select(-1, index)
        # log(1 - sum_c p(c)), accurate when the concept mass is near 0 or 1
        rest = torch.log(-torch.expm1(torch.logsumexp(lp, dim=-1).clamp(max=0.0)))
        return torch.cat([lp, rest.unsqueeze(-1)], dim=-1)

    lp_ref, lp = coarse(ref_logits), coarse(logits)
    p_ref = lp_ref.exp()
    # 0 * log(0 / q) = 0: a bucket the reference gives no mass adds nothing.
    terms = torch.where(p_ref > 0, p_ref * (lp_ref - lp), torch.zeros_like(p_ref))
    return terms.sum(dim=-1)
