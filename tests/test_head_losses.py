"""Every method's loss and every teacher-forced score through the fused head (models/lm_head.py)
equals its full-logits formula on the built-in tiny model: one batch, one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsunlearn.config import MethodConfig
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.benchmarks.mmubench import coarse_logprobs, with_rest_bucket
from dsunlearn.eval.mia import answer_token_logprobs, token_logprob_moments
from dsunlearn.eval.scoring import answer_nll
from dsunlearn.methods import build_method
from dsunlearn.methods.base import example_ce, example_kl, example_nll_sum
from dsunlearn.models import encode_for_loss, load_model_and_processor, logits_of
from dsunlearn.models.lm_head import BACKEND_ENV, teacher_forced

TOL = dict(atol=1e-5, rtol=1e-5)
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


@pytest.fixture(scope="module")
def setup(small_bench):
    bench = load_benchmark(str(small_bench))
    model, processor = load_model_and_processor("tiny-llava", seed=0)
    ref, _ = load_model_and_processor("tiny-llava", seed=1)
    ref.requires_grad_(False)
    ex = vqa_train_examples(bench.forget)[:2] + vqa_train_examples(bench.retain)[:1]
    batch = encode_for_loss(
        processor, [e.question for e in ex], [e.image for e in ex], [e.answer for e in ex]
    )
    batch["labels"][2, :] = -100  # an example without answer tokens
    return model, ref, processor, batch, ex


def _eager(name: str, kind: str, model, ref, batch, cfg: MethodConfig) -> torch.Tensor:
    """The formulas every method used before the fused head, on full model logits."""
    labels = batch["labels"]
    logits = logits_of(model, batch)
    if kind == "forget" and name == "npo":
        with torch.no_grad():
            ref_nll = example_nll_sum(logits_of(ref, batch), labels)
        nll = example_nll_sum(logits, labels)
        return (-(2.0 / cfg.npo_beta) * F.logsigmoid(cfg.npo_beta * (nll - ref_nll))).mean()
    ce = example_ce(logits, labels)
    if kind == "forget":
        return -ce.mean()
    if name == "kl_min":
        with torch.no_grad():
            ref_logits = logits_of(ref, batch)
        kl = example_kl(ref_logits, logits, labels)
        return (cfg.retain_weight * ce + cfg.kl_weight * kl).mean()
    return (cfg.retain_weight if name != "mmunlearner" else 1.0) * ce.mean()


def _loss_and_grads(fn, model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


CASES = [  # GradDiff's losses are GA's and MMUnlearner's with another scale: not repeated
    ("ga", "forget"),
    ("kl_min", "retain"),
    ("npo", "forget"),
    ("mmunlearner", "retain"),
]


@pytest.mark.parametrize("name, kind", CASES)
def test_method_loss_and_grads_equal_the_eager_formula(setup, name, kind):
    model, ref, _, batch, _ = setup
    cfg = MethodConfig(retain_weight=0.7, kl_weight=1.3, npo_beta=0.4)
    method = build_method(name, cfg)
    loss_fn = method.forget_loss if kind == "forget" else method.retain_loss
    got, g_got = _loss_and_grads(lambda: loss_fn(model, batch, ref), model)
    method.head.release()  # what before_step does first (mmunlearner's needs its mask)
    want, g_want = _loss_and_grads(lambda: _eager(name, kind, model, ref, batch, cfg), model)
    torch.testing.assert_close(got, want, **TOL)
    assert set(g_got) == set(g_want) and any("lm_head" in n for n in g_got)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], atol=1e-5, rtol=5e-4, msg=n)


def test_eager_backend_switch_gives_the_same_loss(setup, monkeypatch):
    model, _, _, batch, _ = setup
    method = build_method("ga", MethodConfig())
    with torch.no_grad():
        chunked = method.forget_loss(model, batch, None)
        monkeypatch.setenv(BACKEND_ENV, "eager")
        eager = method.forget_loss(model, batch, None)
    torch.testing.assert_close(chunked, eager, **TOL)


def test_scores_equal_the_logits_formulas(setup):
    model, _, processor, batch, ex = setup
    labels = batch["labels"]
    with torch.no_grad():
        logits = logits_of(model, batch)
    want_lp, want_mask = answer_token_logprobs(logits, labels)
    want_mu, want_sigma = token_logprob_moments(logits, labels)
    ids = [3, 17, 5]
    with teacher_forced(model, batch) as tf:
        mu, sigma = tf.token_moments()
        lp, mask = tf.token_logprobs()
        lse = tf.stats().lse
        coarse = [with_rest_bucket(tf.logprobs_of(ids, lse, r)) for r in range(len(ex))]
    assert torch.equal(mask, want_mask)
    for a, b in ((lp, want_lp), (mu, want_mu), (sigma, want_sigma)):
        torch.testing.assert_close(a, b, **TOL)
    shifted = logits[:, :-1]
    for r, c in enumerate(coarse):
        torch.testing.assert_close(c, coarse_logprobs(shifted[r][want_mask[r]], ids), **TOL)
    assert coarse[2].shape == (0, len(ids) + 1)


def test_answer_nll_with_skipped_ids_equals_relabelled_logits(setup):
    model, _, processor, _, ex = setup
    answers = [e.answer for e in ex]
    skip = [[], list(range(0, 400, 2)), [7]]
    got = answer_nll(model, processor, ex, answers, 2, INFO, skip_ids=skip)
    batch = encode_for_loss(processor, [e.question for e in ex], [e.image for e in ex], answers)
    labels = batch["labels"].clone()
    for r, ids in enumerate(skip):
        labels[r, torch.isin(labels[r], torch.tensor(ids, dtype=torch.long))] = -100
    with torch.no_grad():
        nll = example_nll_sum(logits_of(model, batch), labels)
    assert got[0] == pytest.approx(nll.sum().item(), rel=1e-5)
    assert got[1] == (labels[:, 1:] != -100).sum().item()
