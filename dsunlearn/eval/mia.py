"""Loss-based membership inference and MMUBench's C-Dis, as pure tensor functions.

Membership inference asks whether an item was in the training data. After unlearning, the
forget items should look like items the model never saw: the AUC of a member-vs-nonmember
score that separates them should fall to about 0.5.

The score is min-k% token probability (Shi et al. 2023, "Detecting Pretraining Data from Large
Language Models", arXiv 2310.16789): the mean of the k% lowest token log-probabilities of the
answer. Seen text has few very unlikely tokens, so a higher score means "more likely a member".

The rest of the suite (papers README, "Membership inference"): LOSS, zlib, Min-K%++ scores and
TPR at a fixed FPR. Every score follows the same sign convention: higher = more likely a member.

The scorers get the per-token log-probabilities and moments from the fused head op
(`models.lm_head.TeacherForced`, `kernels.linear_logprob`); `answer_token_logprobs` and
`token_logprob_moments` below compute the same from full logits (the op's eager reference).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from dsunlearn.models.encode import IGNORE_INDEX
from kernels.linear_logprob import TokenStats, logprob_from_logits


def answer_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each labelled token [B, T-1] fp32, mask [B, T-1] bool) from logits [B, T, V]
    and labels [B, T] (IGNORE_INDEX = -100 outside the answer), shifted like the models:
    position t's logits predict label t+1 (as `encode._token_nll`). Unlabelled positions hold 0.

    Only labelled positions are upcast and normalised, as in `encode._token_nll`.
    """
    st, mask = _labelled_stats(logits, labels, moments=False)
    return _grid(st.logprob, mask), mask


def _labelled_stats(
    logits: torch.Tensor, labels: torch.Tensor, moments: bool
) -> tuple[TokenStats, torch.Tensor]:
    """`kernels.linear_logprob.logprob_from_logits` of the labelled positions, and their mask."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shift_labels = labels[:, 1:].to(logits.device)
    mask = shift_labels != IGNORE_INDEX
    return logprob_from_logits(logits[:, :-1, :][mask], shift_labels[mask], moments), mask


def _grid(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out[mask] = values
    return out


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
    pos, neg = _checked_scores(member_scores, nonmember_scores)
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


def _checked_scores(
    member_scores: Sequence[float] | torch.Tensor, nonmember_scores: Sequence[float] | torch.Tensor
) -> tuple[list[float], list[float]]:
    """Both sides as float lists; a nan score raises (it would be silently ranked otherwise)."""
    pos = [float(x) for x in _as_list(member_scores)]
    neg = [float(x) for x in _as_list(nonmember_scores)]
    if any(math.isnan(x) for x in pos + neg):
        raise ValueError("scores contain nan")
    return pos, neg


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


# ------------------------------------------------------------------ more attacks and TPR@FPR


def _check_rows(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if token_logprobs.shape != mask.shape or token_logprobs.dim() != 2:
        raise ValueError(
            f"token_logprobs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} must be "
            "the same [N, T] shape"
        )
    return mask.bool()


def loss_score(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LOSS attack (Yeom et al. 2018, "Privacy Risk in Machine Learning") per row [N] fp32: the
    mean log-probability of the row's unmasked answer tokens, i.e. minus the mean token NLL.
    Training lowers a member's loss, so the sign is flipped from the NLL to keep higher =
    member. nan for a row without unmasked tokens (as `min_k_percent`, which at k = 100 gives
    the same value)."""
    mask = _check_rows(token_logprobs, mask)
    lp = torch.where(
        mask, token_logprobs.float(), torch.zeros_like(token_logprobs, dtype=torch.float32)
    )
    n = mask.sum(dim=1)
    out = lp.sum(dim=1) / n.clamp(min=1).to(torch.float32)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


def zlib_bytes(text: str) -> int:
    """zlib-compressed length in bytes of the text's UTF-8 (default level): the zlib attack's
    reference code length. Never 0 (the empty string compresses to 8 bytes)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(
    token_logprobs: torch.Tensor, mask: torch.Tensor, texts: Sequence[str]
) -> torch.Tensor:
    """zlib attack (Carlini et al. 2021, "Extracting Training Data from Large Language Models")
    per row [N] fp32: (sum of the row's unmasked answer-token log-probabilities) /
    `zlib_bytes(texts[i])`, with texts[i] the answer text those tokens spell.

    The total log-likelihood (not the mean) is the form the papers README gives ("the total NLL
    divided by the zlib-compressed length"): numerator and denominator are then both the code
    length of the whole text, under the model (nats) and under zlib (bytes), so the ratio asks
    "how much better than a generic compressor does the model compress this text", not merely
    "is this text easy" (which zlib's length calibrates away). Carlini et al. divide the log
    perplexity (the mean NLL) instead; the two rank texts differently when token counts differ.
    The NLL is negated (the log-likelihood is used), so higher = member: a member has a total
    log-likelihood closer to 0 for the same zlib length. nan for a row without tokens.
    """
    mask = _check_rows(token_logprobs, mask)
    if len(texts) != token_logprobs.shape[0]:
        raise ValueError(f"{len(texts)} texts for {token_logprobs.shape[0]} rows")
    lp = torch.where(
        mask, token_logprobs.float(), torch.zeros_like(token_logprobs, dtype=torch.float32)
    )
    size = torch.tensor([zlib_bytes(t) for t in texts], dtype=torch.float32, device=lp.device)
    out = lp.sum(dim=1) / size
    return torch.where(mask.any(dim=1), out, torch.full_like(out, math.nan))


def token_logprob_moments(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) [B, T-1] fp32 for Min-K%++: the mean and standard deviation of log p(z) for
    z ~ p, p the full next-token distribution at each labelled position, shifted like
    `answer_token_logprobs` (position t's logits predict label t+1). Unlabelled positions hold
    0; only labelled positions are upcast and normalised.

    mu = E_p[log p(z)] (minus the entropy); sigma = sqrt(E_p[(log p(z) - mu)^2]), equal to
    sqrt(E_p[(log p)^2] - mu^2) but computed centred, and relative to the top log-probability
    m: with d = log p - m, mu = m + E_p[d] and sigma^2 = E_p[(d - E_p[d])^2]. For a distribution
    uniform over its support d is exactly 0 there, so mu equals that log-probability to the bit
    and sigma is exactly 0 (the uncentred form leaves rounding noise of ~1e-7 |mu| in both).
    Tokens with p = 0 (logit -inf) add nothing.
    """
    st, mask = _labelled_stats(logits, labels, moments=True)
    return _grid(st.mu, mask), _grid(st.sigma, mask)


SIGMA_EPS = 1e-6
"""Floor on sigma in `min_k_plus_plus`: sigma = 0 means p is uniform over its support."""


def min_k_plus_plus(
    token_logprobs: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor,
    k: float = 20.0,
) -> torch.Tensor:
    """Min-K%++ (Zhang et al. 2024, arXiv 2404.02936) per row [N] fp32: each unmasked token
    is normalised to (log p(x_t) - mu_t) / sigma_t (mu, sigma from `token_logprob_moments`),
    then `min_k_percent` takes the mean of the floor(k% of n) lowest, at least 1 (same rule,
    same nan for an empty row). Normalising by the position's own distribution asks whether
    x_t is a local maximum of the likelihood (training pulls members there), so a token that
    is merely hard everywhere no longer looks unseen. Higher = member.

    sigma is clamped to at least SIGMA_EPS = 1e-6. sigma = 0 means p is uniform over its
    support (one-hot included): a token in the support then has log p = mu and scores 0,
    the limit of nearly one-hot distributions; one outside it (log p = -inf) scores -inf.
    """
    mask = _check_rows(token_logprobs, mask)
    if mu.shape != mask.shape or sigma.shape != mask.shape:
        raise ValueError(
            f"mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must match mask {tuple(mask.shape)}"
        )
    z = (token_logprobs.float() - mu.float()) / sigma.float().clamp(min=SIGMA_EPS)
    z = torch.where(mask, z, torch.zeros_like(z))
    return min_k_percent(z, mask, k)


def tpr_at_fpr(
    member_scores: Sequence[float] | torch.Tensor,
    nonmember_scores: Sequence[float] | torch.Tensor,
    fpr: float = 0.01,
) -> float:
    """TPR at a fixed FPR (Carlini et al. 2022, "Membership Inference Attacks From First
    Principles"): low-FPR TPR is what matters for privacy. Scores: higher = member.

    The attack calls a score a member when it is strictly above a threshold tau taken from the
    nonmember scores: with s_1 >= ... >= s_n the n nonmember scores and k = floor(fpr * n) the
    nonmembers allowed above tau, tau = s_{k+1} (-inf when k = n). That is the lowest such
    threshold (the largest achievable FPR <= fpr, hence the largest TPR). Ties are never a
    positive, on either side: nonmembers tied with tau are not false positives (so the achieved
    FPR can be below k/n), members tied with tau are not true positives. No randomised
    threshold interpolates between achievable FPRs. Returns the fraction of members > tau.

    With few nonmembers fpr * n can be below 1 (50 nonmembers at 1% is half an item): the only
    achievable FPR <= fpr is 0, and this returns the TPR at FPR 0, the fraction of members
    strictly above the top nonmember score. nan when either side is empty; a nan score raises.
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr is a fraction in [0, 1], got {fpr}")
    pos, neg = _checked_scores(member_scores, nonmember_scores)
    if not pos or not neg:
        return math.nan
    # the 1e-9 keeps float error from dropping an allowed nonmember: 1% of 100 is 1
    k = min(math.floor(fpr * len(neg) + 1e-9), len(neg))
    ordered = sorted(neg, reverse=True)
    tau = ordered[k] if k < len(neg) else -math.inf
    return sum(x > tau for x in pos) / len(pos)
