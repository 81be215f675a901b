"""Each method lowers its own objective on a fixed batch, and the loss pieces are right."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsunlearn.config import MethodConfig
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.errors import ConfigError, MethodError
from dsunlearn.methods import METHODS, build_method
from dsunlearn.methods.base import example_ce, example_kl, example_nll_sum
from dsunlearn.models import encode_for_loss, load_model_and_processor
from dsunlearn.models.encode import logits_of, module_output
from kernels.linear_kl_ce import kl_ce_from_logits


def _encode(processor, examples):
    return encode_for_loss(
        processor,
        [e.question for e in examples],
        [e.image for e in examples],
        [e.answer for e in examples],
    )


@pytest.fixture(scope="module")
def bench(small_bench):
    return load_benchmark(str(small_bench))


@pytest.fixture(scope="module")
def setup(bench):
    model, processor = load_model_and_processor("tiny-llava", seed=0)
    forget = vqa_train_examples(bench.forget)[:4]
    retain = vqa_train_examples(bench.retain)[:4]
    return model, _encode(processor, forget), _encode(processor, retain)


@pytest.fixture(scope="module")
def knowing(setup):
    """The random model after 20 CE steps on the forget batch (answer CE ~0.3): a vanilla
    model that knows what it must forget. On the random model an answer token has log p ~ -6,
    which leaves SimNPO saturated and UNDIAL's KL at ~2e-3, with nothing to lower."""
    model, forget, retain = setup
    model = copy.deepcopy(model).train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        example_ce(logits_of(model, forget), forget["labels"]).mean().backward()
        opt.step()
    return model.eval(), forget, retain


NEW_METHODS = ["simnpo", "idkpo", "undial", "rmu"]


def test_registry_has_the_methods():
    assert {"ga", "graddiff", "kl_min", "npo", *NEW_METHODS} <= set(METHODS)
    with pytest.raises(MethodError, match="unknown method 'nope'"):
        build_method("nope", MethodConfig())


@pytest.mark.parametrize("name", ["ga", "graddiff", "kl_min", "npo", *NEW_METHODS])
def test_method_lowers_its_objective(bench, knowing, name):
    vanilla, forget, retain = knowing
    torch.manual_seed(0)
    model = copy.deepcopy(vanilla).train()
    ref = copy.deepcopy(vanilla).eval().requires_grad_(False)
    method = build_method(name, MethodConfig())
    method.prepare_model(model)  # RMU freezes all but its MLPs
    if name == "idkpo":  # its forget batch holds each question twice: true answer, refusal
        _, processor = load_model_and_processor("tiny-llava", seed=0)
        rng = np.random.default_rng(0)
        forget = _encode(processor, method.views(vqa_train_examples(bench.forget)[:4], rng))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)

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


def _head_free_logprobs(model, batch):
    """Per-example answer log-prob sums and lengths from full logits (the references)."""
    logits = logits_of(model, batch)
    return -example_nll_sum(logits, batch["labels"]), (batch["labels"][:, 1:] != -100).sum(1)


def test_simnpo_is_the_papers_formula(setup):
    model, forget, _ = setup
    cfg = MethodConfig(simnpo_beta=2.5, simnpo_gamma=0.5)
    with torch.no_grad():
        got = build_method("simnpo", cfg).forget_loss(model, forget, None)
        logp, n = _head_free_logprobs(model, forget)
    want = (-(2 / 2.5) * F.logsigmoid(-(2.5 / n) * logp - 0.5)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert not build_method("simnpo", MethodConfig(retain_weight=0)).uses_retain


def test_idkpo_pairs_each_question_with_one_refusal_and_starts_at_ln2(bench, setup):
    """Same question, same refusal, whichever rank or batch it lands in; at the reference the
    DPO loss is -log sigmoid(0) = ln 2."""
    from dsunlearn.methods.idkpo import REFUSALS

    model, _, _ = setup
    method = build_method("idkpo", MethodConfig())
    ex = vqa_train_examples(bench.forget)[:4]
    views = method.views(ex, np.random.default_rng(0))
    again = method.views(list(reversed(ex)), np.random.default_rng(1))
    assert views[:4] == ex and all(v.answer in REFUSALS for v in views[4:])
    assert [v.question for v in views[4:]] == [e.question for e in ex]
    assert {v.question: v.answer for v in views[4:]} == {v.question: v.answer for v in again[4:]}
    _, processor = load_model_and_processor("tiny-llava", seed=0)
    with torch.no_grad():
        loss = method.forget_loss(model, _encode(processor, views), model)
    assert loss.item() == pytest.approx(np.log(2), rel=1e-6)


def test_idkpo_refusal_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        build_method("idkpo", MethodConfig(idkpo_refusals=str(tmp_path / "nope.txt")))
    (tmp_path / "r.txt").write_text("No idea.\n\n")
    assert build_method("idkpo", MethodConfig(idkpo_refusals=str(tmp_path / "r.txt"))).refusals == (
        "No idea.",
    )


def test_undial_is_kl_to_the_teacher_with_the_label_logit_lowered(setup):
    model, forget, _ = setup
    gamma = 3.0
    with torch.no_grad():
        got = build_method("undial", MethodConfig(undial_gamma=gamma)).forget_loss(
            model, forget, model
        )
        logits = logits_of(model, forget)[:, :-1]
    labels = forget["labels"][:, 1:]
    per_example = []
    for b in range(len(labels)):
        sel = labels[b] != -100
        _, kl = kl_ce_from_logits(logits[b][sel], logits[b][sel], labels[b][sel], gamma)
        per_example.append(kl.mean())
    want = torch.stack(per_example).mean()
    assert got.item() == pytest.approx(want.item(), abs=1e-7) and got.item() > 1e-3
    with torch.no_grad():  # the model is its own teacher: only the shift makes a loss
        unshifted = build_method("undial", MethodConfig(undial_gamma=1e-9)).forget_loss(
            model, forget, model
        )
    assert abs(unshifted.item()) < 1e-6
    with pytest.raises(ConfigError, match="undial_gamma"):
        build_method("undial", MethodConfig(undial_gamma=0))


def test_rmu_trains_only_its_layers_and_steers_toward_c_u(setup):
    from dsunlearn.methods.rmu import steered_layer

    assert steered_layer(-1, 32) == 7 and steered_layer(-1, 4) == 2 and steered_layer(1, 4) == 1
    with pytest.raises(ConfigError, match="has 4 decoder layers"):
        steered_layer(4, 4)
    vanilla, forget, retain = setup
    model = copy.deepcopy(vanilla)
    method = build_method("rmu", MethodConfig())
    method.prepare_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"model.language_model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
    assert trainable == want
    with torch.no_grad():
        assert method.retain_loss(model, retain, vanilla).item() == 0.0  # the frozen model
        loss = method.forget_loss(model, forget, None)
        h = module_output(model, forget, model.model.language_model.layers[2])
    u = method.direction
    assert u.norm().item() == pytest.approx(1.0) and (u >= 0).all()
    m = forget["attention_mask"].float()
    sq = ((h - 6.5 * u) ** 2).mean(-1)
    want_loss = ((sq * m).sum(1) / m.sum(1)).mean()
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="no module 'mlp.nope'"):
        build_method("rmu", MethodConfig(rmu_modules=["mlp.nope"])).prepare_model(
            copy.deepcopy(vanilla)
        )
