"""SIU's identity-probe metrics (eff, gen, div, flu) on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from dsunlearn.config import EvalConfig
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.data.siu import choose_image, pixel_hash
from dsunlearn.data.siu_templates import NEW_NAME_QUESTIONS
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.evaluate import (
    EvalSets,
    build_eval_sets,
    evaluate_suite,
    generate_probe_answers,
    probe_fluency,
)
from dsunlearn.eval.metrics import perplexity
from dsunlearn.eval.scoring import answer_nll
from dsunlearn.models import encode_for_loss, load_model_and_processor

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
CFG = EvalConfig(batch_size=16, max_items=2, gen_max_new_tokens=4)


@pytest.fixture(scope="module")
def bench(small_bench):
    return load_benchmark(str(small_bench))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = load_model_and_processor("tiny-llava", seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def sets(bench):
    return build_eval_sets(bench, CFG, seed=0)


def test_probe_count_and_images(bench, sets):
    n_heldout = {
        e.id: sum(len(r.images) for r in bench.test_forget if r.id == e.id) for e in bench.forget
    }
    assert all(n_heldout.values()), "the benchmark must hold held-out images of forget people"
    expected = sum(len(NEW_NAME_QUESTIONS) * (1 + n) for n in n_heldout.values())
    assert len(sets.probes) == expected
    for e in bench.forget:
        mine = [p for p in sets.probes if p.entity_id == e.id]
        train = [p for p in mine if p.split == "train"]
        held = [p for p in mine if p.split == "heldout"]
        assert [p.question for p in train] == list(NEW_NAME_QUESTIONS)
        assert len(held) == len(NEW_NAME_QUESTIONS) * n_heldout[e.id]
        assert {p.name for p in mine} == {e.name}
        heldout_images = [im for r in bench.test_forget if r.id == e.id for im in r.images]
        _, siu_image = choose_image(e, heldout_images, 0)
        assert {pixel_hash(p.image) for p in train} == {pixel_hash(siu_image)}
        assert {pixel_hash(p.image) for p in held} == {pixel_hash(im) for im in heldout_images}
        assert pixel_hash(siu_image) not in {pixel_hash(p.image) for p in held}


def test_siu_image_index_moves_the_train_probes(bench):
    e = bench.forget[0]
    if len(e.images) < 2:
        pytest.skip("one training image only")
    a = [p for p in build_eval_sets(bench, CFG).probes if p.split == "train"][0]
    b = [p for p in build_eval_sets(bench, CFG, siu_image_index=1).probes if p.split == "train"]
    assert pixel_hash(a.image) != pixel_hash(b[0].image)


def test_evaluate_adds_probe_metrics_and_own_flu(tiny, sets):
    model, processor = tiny
    sets = EvalSets(mc={}, gen={}, probes=sets.probes)  # probes only: keeps the test quick
    out = evaluate_suite(model, processor, sets, CFG, INFO, zero3=False).metrics
    assert {"eff", "gen", "div", "flu"} <= out.keys()
    for k in ("eff", "gen", "div"):
        assert 0.0 <= out[k] <= 1.0
    assert math.isfinite(out["flu"]) and out["flu"] >= 1.0
    # flu without original answers is the perplexity on the model's own greedy answers
    own = generate_probe_answers(model, processor, sets, CFG, INFO, zero3=False)
    assert len(own) == len(sets.probes)
    assert out["flu"] == pytest.approx(probe_fluency(model, processor, sets.probes, own, 16, INFO))
    # ... and `original_answers` changes what is scored
    other = ["I do not know who this is ." for _ in sets.probes]
    out2 = evaluate_suite(
        model, processor, sets, CFG, INFO, zero3=False, original_answers=other, probe_answers=own
    ).metrics
    assert out2["eff"] == out["eff"] and out2["div"] == out["div"]
    assert out2["flu"] != pytest.approx(out["flu"])


def test_no_generation_no_probes(tiny, sets, monkeypatch):
    import dsunlearn.eval.evaluate as ev

    def boom(*a, **k):
        raise AssertionError("generation must not run")

    monkeypatch.setattr(ev, "generate_answers", boom)
    monkeypatch.setattr(ev, "answer_nll", boom)
    model, processor = tiny
    small = EvalSets(
        mc={"forget_vqa_acc": sets.mc["forget_vqa_acc"]}, gen=sets.gen, probes=sets.probes
    )
    out = evaluate_suite(
        model, processor, small, CFG, INFO, zero3=False, include_generation=False
    ).metrics
    assert set(out) == {"forget_vqa_acc"}


def test_flu_leaves_name_tokens_out(tiny, sets):
    model, processor = tiny
    probes = sets.probes[:3]
    name = probes[0].name
    answers = [f"This is {name} .", f"{name} , of course .", "Nobody I know ."]
    without = probe_fluency(model, processor, probes, answers, 2, INFO)
    nll, tokens = answer_nll(model, processor, probes, answers, 2, INFO)
    with_names = perplexity(nll, tokens)
    assert math.isfinite(without) and without >= 1.0
    assert without != pytest.approx(with_names)
    # only the given ids are dropped: with every ordinary token skipped, the special labels
    # remain (each row's EOS, and UNK for words the tiny vocabulary lacks)
    tok = processor.tokenizer
    special = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in special]
    _, kept = answer_nll(model, processor, probes, answers, 2, INFO, skip_ids=[ordinary] * 3)
    labels = encode_for_loss(
        processor, [p.question for p in probes], [p.image for p in probes], answers
    )["labels"]
    assert kept == sum(int(x) in special for x in labels.flatten())
    assert kept >= 3  # at least the EOS of every row
    # an answer without the name scores identically with and without the mask
    a, b = answer_nll(model, processor, probes[2:], answers[2:], 1, INFO)
    c, d = answer_nll(model, processor, probes[2:], answers[2:], 1, INFO, skip_ids=[[10**9]])
    assert (a, b) == (c, d)


def test_answer_nll_batching_and_padding_agree(tiny, sets):
    """Padded shards (batch not dividing the items) score each answer exactly once."""
    model, processor = tiny
    probes = sets.probes[:5]
    answers = ["A person .", "", "Someone else .", "This is nobody .", "Hello ."]
    one = answer_nll(model, processor, probes, answers, 1, INFO)
    three = answer_nll(model, processor, probes, answers, 3, INFO)
    assert one[1] == three[1]
    assert one[0] == pytest.approx(three[0], rel=1e-4)
