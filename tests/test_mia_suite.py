"""Membership-inference suite (LOSS, zlib, Min-K%++, TPR at a fixed FPR) on hand-computed cases."""

from __future__ import annotations

import itertools
import math
import random
import zlib

import pytest
import torch

from dsunlearn.eval.mia import (
    SIGMA_EPS,
    answer_token_logprobs,
    loss_score,
    min_k_percent,
    min_k_plus_plus,
    token_logprob_moments,
    tpr_at_fpr,
    zlib_bytes,
    zlib_score,
)
from dsunlearn.models.encode import IGNORE_INDEX

NAN = float("nan")

# ---------------------------------------------------------------------------------- LOSS


def test_loss_score_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    out = loss_score(lp, mask)
    # (-1 - 2 - 3) / 3 = -2; one token: -0.5 (the masked -9s never count); no token: nan
    assert out.dtype == torch.float32
    assert out[:2].tolist() == [-2.0, -0.5]
    assert math.isnan(out[2])
    # the mean log-probability is min-k% at k = 100
    assert out[:2].tolist() == min_k_percent(lp, mask, 100)[:2].tolist()
    # higher = member: a lower NLL scores higher
    assert out[1] > out[0]
    with pytest.raises(ValueError, match="shape"):
        loss_score(lp, mask[:, :2])


# ---------------------------------------------------------------------------------- zlib


def test_zlib_bytes_is_zlib_compress_length():
    for text in ("", "a" * 100, "the cat sat on the mat", "Paris", "Zoë"):
        assert zlib_bytes(text) == len(zlib.compress(text.encode("utf-8")))
    # fixed by the zlib format at the default level: an empty stream is 8 bytes (2 header,
    # 2 empty block, 4 Adler-32); 100 repeats of one letter collapse to 12
    assert zlib_bytes("") == 8
    assert zlib_bytes("a" * 100) == 12
    assert zlib_bytes("the cat sat on the mat") == 27


def test_zlib_score_hand_computed():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-6.0, -7.0, -9.0], [-4.0, -4.0, -4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    texts = ["a" * 100, "the cat sat on the mat", "x"]
    out = zlib_score(lp, mask, texts)
    # total, not mean: (-1 - 2 - 3) / 12 = -0.5; (-6 - 7) / 27 (the -9 is masked); empty: nan
    assert out[0].item() == pytest.approx(-0.5)
    assert out[1].item() == pytest.approx(-13.0 / 27.0)
    assert math.isnan(out[2])
    assert out[:2].tolist() == pytest.approx(
        [
            -6.0 / len(zlib.compress(b"a" * 100)),
            -13.0 / len(zlib.compress(b"the cat sat on the mat")),
        ]
    )
    with pytest.raises(ValueError, match="texts"):
        zlib_score(lp, mask, texts[:2])


# ---------------------------------------------------------------------------------- moments


def test_moments_of_uniform_distribution():
    # V = 7 equal logits: every log p = -log 7, so mu = -log 7 and sigma = 0 exactly (the
    # uncentred E[(log p)^2] - mu^2 leaves fp32 noise at V = 7)
    logits = torch.full((1, 2, 7), 3.0)
    labels = torch.tensor([[IGNORE_INDEX, 4]])
    mu, sigma = token_logprob_moments(logits, labels)
    lp, _ = answer_token_logprobs(logits, labels)
    assert mu.shape == sigma.shape == (1, 1) and mu.dtype == sigma.dtype == torch.float32
    assert mu.item() == pytest.approx(-math.log(7.0))
    assert sigma.item() == 0.0
    assert lp.item() == mu.item()  # so Min-K%++ scores it 0, not noise / eps
    assert min_k_plus_plus(lp, mu, sigma, labels[:, 1:] != IGNORE_INDEX).item() == 0.0


def test_moments_of_two_token_distribution_and_shift():
    # position 0: logits (0, ln 3) -> p = (1/4, 3/4), predicts label 1
    # position 1: logits (0, 0) -> uniform on 2; position 2 unlabelled -> 0
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 1.0], [9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    mu, sigma = token_logprob_moments(logits, labels)
    # mu = 1/4 ln(1/4) + 3/4 ln(3/4); a two-point variable a, b with probs p, q has
    # sigma = sqrt(p q) |a - b| = sqrt(3/16) * |ln(1/4) - ln(3/4)| = sqrt(3) / 4 * ln 3
    mu0 = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    sigma0 = math.sqrt(3.0) / 4.0 * math.log(3.0)
    assert mu[0].tolist() == pytest.approx([mu0, -math.log(2.0), 0.0], abs=1e-6)
    assert sigma[0].tolist() == pytest.approx([sigma0, 0.0, 0.0], abs=1e-6)
    assert sigma[0, 1].item() == 0.0 and mu[0, 2].item() == 0.0 and sigma[0, 2].item() == 0.0
    # z for the likely token: (ln 3/4 - mu) / sigma = p / sqrt(p q) = sqrt(1/3);
    # for the unlikely one: -sqrt(3)
    lp, mask = answer_token_logprobs(logits, labels)
    z = min_k_plus_plus(lp[:, :1], mu[:, :1], sigma[:, :1], mask[:, :1])
    assert z.item() == pytest.approx(math.sqrt(1.0 / 3.0), abs=1e-5)
    labels[0, 1] = 0
    lp, mask = answer_token_logprobs(logits, labels)
    z = min_k_plus_plus(lp[:, :1], mu[:, :1], sigma[:, :1], mask[:, :1])
    assert z.item() == pytest.approx(-math.sqrt(3.0), abs=1e-5)


def test_moments_of_one_hot_and_zero_probability_tokens():
    # row 0: exp(-1000) underflows, p = (1, 0, 0): mu = 0, sigma = 0
    # row 1: a -inf logit: p = (1/2, 1/2, 0): mu = -ln 2, sigma = 0, and no nan from 0 * -inf
    logits = torch.tensor(
        [
            [[0.0, -1000.0, -1000.0], [0.0, 0.0, 0.0]],
            [[0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[IGNORE_INDEX, 0], [IGNORE_INDEX, 1]])
    mu, sigma = token_logprob_moments(logits, labels)
    assert mu[:, 0].tolist() == pytest.approx([0.0, -math.log(2.0)])
    assert sigma[:, 0].tolist() == [0.0, 0.0]
    lp, mask = answer_token_logprobs(logits, labels)
    # the argmax token of a one-hot p scores 0 (sigma clamped to SIGMA_EPS, numerator 0)
    assert min_k_plus_plus(lp, mu, sigma, mask).tolist() == [0.0, 0.0]
    # a token one-hot p gives ~0 mass: (-1000 - 0) / SIGMA_EPS
    labels[0, 1] = 2
    lp, mask = answer_token_logprobs(logits, labels)
    out = min_k_plus_plus(lp, mu, sigma, mask)
    assert out[0].item() == pytest.approx(-1000.0 / SIGMA_EPS, rel=1e-5)
    assert out[0].item() == pytest.approx(-1e9, rel=1e-5)  # SIGMA_EPS = 1e-6


def test_moments_match_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g) * 3
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 3] = IGNORE_INDEX
    mu, sigma = token_logprob_moments(logits, labels)
    assert mu.shape == sigma.shape == (2, 4)
    for b, t in itertools.product(range(2), range(4)):
        if labels[b, t + 1] == IGNORE_INDEX:  # position t predicts label t + 1
            assert mu[b, t].item() == 0.0 and sigma[b, t].item() == 0.0
            continue
        logp = torch.log_softmax(logits[b, t].double(), dim=-1)
        p = logp.exp()
        m = (p * logp).sum().item()
        s = math.sqrt((p * logp.square()).sum().item() - m * m)
        assert mu[b, t].item() == pytest.approx(m, abs=1e-5)
        assert sigma[b, t].item() == pytest.approx(s, abs=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        token_logprob_moments(logits, labels[:, 1:])


# ---------------------------------------------------------------------------------- Min-K%++


def test_min_k_plus_plus_hand_computed():
    lp = torch.tensor(
        [
            [-1.0, -2.0, -0.5, -3.0, -1.0],
            [-2.0, -1.0, -9.0, -9.0, -9.0],  # 2 tokens, the -9s masked
            [-1.0, -1.0, -1.0, -1.0, -1.0],  # all masked
        ]
    )
    mu = torch.tensor(
        [[-2.0, -1.0, -0.5, -1.0, -1.5], [-1.0, -3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    )
    sigma = torch.tensor(
        [[0.5, 2.0, 1.0, 4.0, 0.0], [1.0, 0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    # row 0 z = (lp - mu) / sigma = (2, -0.5, 0, -0.5, 0.5 / SIGMA_EPS = 5e5)
    # row 1 z = (-1, 4)
    out = min_k_plus_plus(lp, mu, sigma, mask, k=40)
    # 40% of 5 = 2 lowest: (-0.5 - 0.5) / 2; 40% of 2 = 0.8 -> at least 1: -1; empty: nan
    assert out[:2].tolist() == [-0.5, -1.0]
    assert math.isnan(out[2])
    # raw min-k% would pick -3, -2 instead: normalising changes which tokens are lowest
    assert min_k_percent(lp, mask, 40)[0].item() == -2.5
    assert min_k_plus_plus(lp, mu, sigma, mask, k=20)[0].item() == -0.5
    assert min_k_plus_plus(lp, mu, sigma, mask, k=60)[0].item() == pytest.approx(-1.0 / 3.0)
    # k = 100 shows the clamped sigma = 0 token: (2 - 0.5 + 0 - 0.5 + 5e5) / 5
    all_tokens = min_k_plus_plus(lp, mu, sigma, mask, k=100)
    assert all_tokens[0].item() == pytest.approx((1.0 + 0.5 / SIGMA_EPS) / 5, rel=1e-6)
    assert all_tokens[0].item() == pytest.approx(100000.2, rel=1e-6)
    assert all_tokens[1].item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="must match"):
        min_k_plus_plus(lp, mu[:, :2], sigma, mask)
    with pytest.raises(ValueError, match="percentage"):
        min_k_plus_plus(lp, mu, sigma, mask, k=0)


def test_min_k_plus_plus_is_min_k_percent_of_normalised_values():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, 6, generator=g) * 2
    labels = torch.randint(0, 6, (3, 9), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # no answer tokens
    labels[2, -2:] = IGNORE_INDEX
    lp, mask = answer_token_logprobs(logits, labels)
    mu, sigma = token_logprob_moments(logits, labels)
    z = torch.where(mask, (lp - mu) / sigma, torch.zeros_like(lp))
    for k in (10.0, 20.0, 50.0, 100.0):
        got, want = min_k_plus_plus(lp, mu, sigma, mask, k), min_k_percent(z, mask, k)
        assert torch.allclose(got, want, equal_nan=True)
        assert math.isnan(got[1]) and not got[[0, 2]].isnan().any()


# ---------------------------------------------------------------------------------- TPR@FPR


def test_tpr_at_fpr_hand_computed():
    neg = [float(x) for x in range(1, 11)]  # 1..10, n = 10
    pos = [9.5, 9.0, 10.0, 5.0]
    # fpr 0.1: 1 nonmember may be above -> tau = 2nd largest = 9; members > 9: 9.5, 10
    # (the member tied at 9 is not a positive)
    assert tpr_at_fpr(pos, neg, 0.1) == 0.5
    # fpr 0.25: floor(2.5) = 2 -> tau = 8: 9.5, 9, 10
    assert tpr_at_fpr(pos, neg, 0.25) == 0.75
    # fpr 0: tau = max nonmember 10: nothing strictly above
    assert tpr_at_fpr(pos, neg, 0.0) == 0.0
    # fpr 1: tau = -inf, every member
    assert tpr_at_fpr(pos, neg, 1.0) == 1.0
    # tensors work as well as lists
    assert tpr_at_fpr(torch.tensor(pos), torch.tensor(neg), 0.1) == 0.5


def test_tpr_at_fpr_ties_among_nonmembers():
    neg = [5.0, 5.0, 5.0, 1.0]
    pos = [5.0, 6.0, 4.0]
    # fpr 0.25 and 0.5: tau = 5 (the 2nd / 3rd largest); achieved FPR 0, not 1/4 or 1/2,
    # since going below 5 would admit all three tied nonmembers (3/4); members > 5: only 6
    assert tpr_at_fpr(pos, neg, 0.25) == pytest.approx(1 / 3)
    assert tpr_at_fpr(pos, neg, 0.5) == pytest.approx(1 / 3)
    # fpr 0.75: tau = 1, achieved FPR 3/4; members > 1: all
    assert tpr_at_fpr(pos, neg, 0.75) == 1.0
    # all tied: nothing is strictly above
    assert tpr_at_fpr([2.0, 2.0], [2.0, 2.0, 2.0], 0.5) == 0.0


def test_tpr_at_fpr_with_few_nonmembers_is_tpr_at_fpr_zero():
    neg = [float(x) for x in range(50)]  # 0..49: 1% of 50 is half an item
    pos = [49.0, 49.5, 100.0, 0.0]
    # only FPR 0 is achievable: members strictly above 49
    assert tpr_at_fpr(pos, neg, 0.01) == 0.5
    assert tpr_at_fpr(pos, neg, 0.01) == tpr_at_fpr(pos, neg, 0.0)
    # 2% of 50 = 1 nonmember above -> tau = 48: 49, 49.5, 100
    assert tpr_at_fpr(pos, neg, 0.02) == 0.75
    # float error does not drop an allowed nonmember: 0.29 * 100 = 28.999999999999996 -> 29,
    # tau = 30th largest of 0..99 = 70
    assert tpr_at_fpr([70.0, 70.5, 71.0], [float(x) for x in range(100)], 0.29) == pytest.approx(
        2 / 3
    )


def test_tpr_at_fpr_matches_brute_force():
    # brute force: over every threshold (each nonmember score, and -inf) whose FPR (nonmembers
    # strictly above) is <= fpr, the best TPR (members strictly above)
    rng = random.Random(0)
    for _ in range(200):
        neg = [float(rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        pos = [float(rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        fpr = rng.choice([0.0, 0.01, 0.1, 0.2, 0.25, 0.5, 0.9, 1.0])
        best = max(
            sum(x > t for x in pos) / len(pos)
            for t in [*neg, -math.inf]
            if sum(x > t for x in neg) / len(neg) <= fpr + 1e-12
        )
        assert tpr_at_fpr(pos, neg, fpr) == best


def test_tpr_at_fpr_edge_cases():
    assert math.isnan(tpr_at_fpr([], [1.0])) and math.isnan(tpr_at_fpr([1.0], []))
    with pytest.raises(ValueError, match="nan"):
        tpr_at_fpr([NAN], [1.0])
    with pytest.raises(ValueError, match="nan"):
        tpr_at_fpr([1.0], [2.0, NAN])
    for fpr in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            tpr_at_fpr([1.0], [2.0], fpr)
