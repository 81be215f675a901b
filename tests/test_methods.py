"""Each method lowers its own objective on a fixed batch, and the loss pieces are right."""

from __future__ import annotations

import copy

import pytest
import torch

from dsunlearn.config import MethodConfig
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.errors import MethodError
from dsunlearn.methods import METHODS, build_method
from dsunlearn.methods.base import example_ce, example_kl, example_nll_sum
from dsunlearn.models import encode_for_loss, load_model_and_processor


@pytest.fixture(scope="module")
def setup(small_bench):
    bench = load_benchmark(str(small_bench))
    model, processor = load_model_and_processor("tiny-llava", seed=0)

    def batch(records, n=4):
        ex = vqa_train_examples(records)[:n]
        return encode_for_loss(
            processor, [e.question for e in ex], [e.image for e in ex], [e.answer for e in ex]
        )

    return model, batch(bench.forget), batch(bench.retain)


def test_registry_has_the_baselines():
    assert {"ga", "graddiff", "kl_min", "npo"} <= set(METHODS)
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        build_method("nope", MethodConfig())


@pytest.mark.parametrize("name", ["ga", "graddiff", "kl_min", "npo"])
def test_method_lowers_its_objective(setup, name):
    vanilla, forget, retain = setup
    torch.manual_seed(0)
    model = copy.deepcopy(vanilla).train()
    ref = copy.deepcopy(vanilla).eval().requires_grad_(False)
    method = build_method(name, MethodConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def objective(kind: str) -> float:
        with torch.no_grad():
            if kind == "forget":
                return method.forget_loss(model, forget, ref).item()
            return method.retain_loss(model, retain, ref).item()

    kinds = ["forget"] + (["retain"] if method.uses_retain else [])
    for kind in kinds:
        before = objective(kind)
        for _ in range(3):
            opt.zero_grad()
            batch = forget if kind == "forget" else retain
            loss_fn = method.forget_loss if kind == "forget" else method.retain_loss
            loss_fn(model, batch, ref).backward()
            opt.step()
        after = objective(kind)
        assert after < before - 1e-3, f"{name} {kind}: {before:.4f} -> {after:.4f}"


def test_npo_starts_at_2_ln2_over_beta(setup):
    model, forget, _ = setup
    method = build_method("npo", MethodConfig(npo_beta=0.4))
    with torch.no_grad():
        loss = method.forget_loss(model, forget, model)
    assert loss.item() == pytest.approx(2 / 0.4 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)


def test_reference_methods_refuse_no_reference(setup):
    model, forget, retain = setup
    with pytest.raises(MethodError, match="reference"):
        build_method("npo", MethodConfig()).forget_loss(model, forget, None)
    with pytest.raises(MethodError, match="reference"):
        build_method("kl_min", MethodConfig()).retain_loss(model, retain, None)


def test_loss_pieces_on_known_values():
    # 1 example, 3 positions, vocab 2; labels aligned with inputs: answer tokens at 1 and 2.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 9.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    # position 0 predicts token 1 with p=0.5; position 1 predicts token 0 with p=0.5
    ln2 = torch.log(torch.tensor(2.0)).item()
    assert example_ce(logits, labels).item() == pytest.approx(ln2)
    assert example_nll_sum(logits, labels).item() == pytest.approx(2 * ln2)
    assert example_kl(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]])
    p = torch.softmax(torch.tensor([0.0, 0.0]), 0)
    q = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    expected = ((p * (p.log() - q.log())).sum() / 2).item()  # mean over the 2 answer tokens
    assert example_kl(logits, other, labels).item() == pytest.approx(expected, rel=1e-5)
