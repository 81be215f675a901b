"""SIU: the single-image data, its token and vocabulary masks, and the method (fused vs eager)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsunlearn.config import MethodConfig, OptimConfig
from dsunlearn.data import siu_templates as T
from dsunlearn.data.builtin import read_appearances
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.data.siu import (
    TARGETS,
    build_siu_data,
    choose_image,
    name_token_ids,
    pixel_hash,
)
from dsunlearn.data.vocab import FIRST_NAMES, LAST_NAMES
from dsunlearn.errors import DataError
from dsunlearn.methods import build_method
from dsunlearn.models import load_model_and_processor
from dsunlearn.models.encode import encode_for_loss
from dsunlearn.models.tiny import build_tiny_processor
from tests.conftest import DS_CONFIG, REPO, run_deepspeed, save_random_tiny

FAMILIES = ["tiny-llava", "tiny-qwen2-vl"]


@pytest.fixture(scope="module")
def bench(small_bench):
    b = load_benchmark(str(small_bench))
    b.appearance = read_appearances(small_bench)
    return b


def _data(bench, image_index: int = 0, seed: int = 0):
    entity = bench.forget[0]
    return build_siu_data(
        entity,
        bench.retain,
        heldout=bench.test_forget[0].images,
        taken_names=[r.name for r in bench.forget + bench.retain],
        appearance=bench.appearance[entity.id],
        image_index=image_index,
        seed=seed,
    )


# ------------------------------------------------------------------------------------ data


def test_four_targets_with_paraphrases(bench):
    d = _data(bench)
    by_target = {t: [s for s in d.samples if s.target == t] for t in TARGETS}
    for target, samples in by_target.items():
        assert len({s.question for s in samples}) >= 4, target
    # 1: image + who? -> the fabricated name, which is the target phrase
    for s in by_target["new_name"]:
        assert s.image is not None and s.target_phrase == d.new_name and d.new_name in s.answer
        assert d.name not in s.answer
    # 2: image + is <name> here? -> "No ...", the whole answer is the target phrase
    for s in by_target["new_description"]:
        assert s.image is not None and s.target_phrase == s.answer and s.answer.startswith("No")
        assert d.name in s.question
    assert len({s.answer for s in by_target["new_description"]}) == 4  # fabricated looks differ
    # 3: text only, the true facts, no target phrase
    bio = bench.forget[0].biography
    for s in by_target["true_facts"]:
        assert s.image is None and s.target_phrase is None
        assert all(str(v) in s.answer for k, v in bio.items() if k != "Name")
    # 4: other people's text QA, with their true answers
    retain_answers = {mc.options[mc.answer_index] for r in bench.retain for mc in r.mc_text}
    for s in by_target["other_qa"]:
        assert s.image is None and s.target_phrase is None and s.answer in retain_answers
        assert d.name not in s.question


def test_fabricated_name_is_nobody(bench):
    d = _data(bench)
    everyone = {r.name for r in bench.forget + bench.retain + bench.test}
    first, last = d.new_name.split()
    assert d.new_name not in everyone
    assert first not in FIRST_NAMES and last not in LAST_NAMES  # shares no word with any entity
    assert first in T.FABRICATED_FIRST_NAMES and last in T.FABRICATED_LAST_NAMES


def test_description_matches_the_picture_and_deterministic(bench):
    look = bench.appearance[bench.forget[0].id]
    d = _data(bench)
    shown = next(s for s in d.samples if s.target == "new_description").answer
    assert f"{look['skin']} skin" in shown and f"{look['shirt']} shirt" in shown
    again = _data(bench)
    assert [s.answer for s in again.samples] == [s.answer for s in d.samples]


def test_image_recorded_and_never_heldout(bench):
    entity = bench.forget[0]
    heldout = bench.test_forget[0].images
    d = _data(bench, image_index=1)
    assert d.image.image_index == 1 and d.image.entity_id == entity.id
    assert d.image.sha256 == pixel_hash(entity.images[1])
    assert d.image.sha256 not in {pixel_hash(im) for im in heldout}
    assert all(s.image is entity.images[1] for s in d.samples if s.image is not None)
    # a training image that is also a held-out image is skipped, not used
    idx, _ = choose_image(entity, [entity.images[0]], image_index=0)
    assert idx == 1
    with pytest.raises(DataError, match="held-out"):
        choose_image(entity, entity.images, 0)
    with pytest.raises(DataError, match="out of range"):
        choose_image(entity, heldout, len(entity.images))


def _masked_ids(processor, answer: str, phrase: str | None) -> list[int]:
    batch = encode_for_loss(processor, ["Who is this person?"], [None], [answer], [phrase])
    assert not (batch["token_mask"] & (batch["labels"] == -100)).any()  # answer tokens only
    return batch["input_ids"][0][batch["token_mask"][0]].tolist()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_mask_covers_exactly_the_phrase(family):
    tok = build_tiny_processor(family).tokenizer
    processor = build_tiny_processor(family)
    answer = "The person in the picture is Delphine Montague ."
    # exactly the tokens the phrase has in this sentence (after a space), nothing around it
    assert _masked_ids(processor, answer, "Delphine Montague") == _ids(tok, " Delphine Montague")
    assert _masked_ids(processor, answer, "Montague") == _ids(tok, " Montague")
    # the whole answer: every answer token, but not the EOS
    assert _masked_ids(processor, answer, answer) == _ids(tok, " " + answer)
    assert _masked_ids(processor, answer, None) == []
    with pytest.raises(ValueError, match="not in the answer"):
        _masked_ids(processor, answer, "Ansel Farrow")


def test_phrase_that_tokenises_differently_at_a_word_start():
    """Byte-level BPE (tiny-qwen2-vl, like real Qwen2): a name written alone and the same name
    inside a sentence are different tokens. The mask follows the sentence's own tokens (a search
    for the phrase's standalone ids would find nothing), and the vocabulary set holds both."""
    processor = build_tiny_processor("tiny-qwen2-vl")
    tok = processor.tokenizer
    name = "Delphine Montague"
    alone, inside = _ids(tok, name), _ids(tok, " " + name)
    assert alone != inside
    assert _masked_ids(processor, f"This is {name} .", name) == inside
    assert _masked_ids(processor, f"{name} is here .", name) == inside  # answer's first words
    ids = set(name_token_ids(tok, name))
    assert set(alone) <= ids and set(inside) <= ids
    assert set(_ids(tok, "Montague")) <= ids and set(_ids(tok, " Delphine")) <= ids
    assert not ids & set(tok.all_special_ids)


def test_name_ids_word_level():
    tok = build_tiny_processor("tiny-llava").tokenizer
    assert sorted(tok.convert_ids_to_tokens(name_token_ids(tok, "Jorna Quinby"))) == [
        "Jorna",
        "Quinby",
    ]
    with pytest.raises(DataError, match="does not know"):
        name_token_ids(tok, "Zzyzx Qqq")


# ---------------------------------------------------------------------------------- method


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_eager_losses_and_gradients_agree(bench, family):
    model, processor = load_model_and_processor(family, seed=0)
    ref, _ = load_model_and_processor(family, seed=1)
    ref.requires_grad_(False)
    results = {}
    for impl in ("eager", "fused"):
        method = build_method("siu", MethodConfig(siu_loss=impl, siu_beta=0.75, siu_alpha=0.9))
        examples = method.forget_examples(bench, processor)
        batch = encode_for_loss(
            processor,
            [e.question for e in examples[:8]],
            [e.image for e in examples[:8]],
            [e.answer for e in examples[:8]],
            [e.target_phrase for e in examples[:8]],
        )
        assert batch["token_mask"].any()
        model.zero_grad()
        loss = method.forget_loss(model, batch, ref)
        loss.backward()
        method.before_step(None)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (loss.detach(), grads, method)
    (le, ge, me), (lf, gf, mf) = results["eager"], results["fused"]
    torch.testing.assert_close(lf, le, atol=1e-5, rtol=5e-4)
    assert set(ge) == set(gf) and any("lm_head" in n for n in gf)
    for n in ge:
        torch.testing.assert_close(gf[n], ge[n], atol=1e-5, rtol=5e-4, msg=n)
    assert mf.loss_impl in ("fused-torch", "fused-triton") and me.loss_impl == "eager"
    assert mf.drop_ids == me.drop_ids and len(mf.drop_ids) >= 2


def test_drop_ids_hold_every_forget_name(bench):
    processor = build_tiny_processor("tiny-llava")
    method = build_method("siu", MethodConfig())
    method.forget_examples(bench, processor)
    tok = processor.tokenizer
    for r in bench.forget:
        assert set(name_token_ids(tok, r.name)) <= set(method.drop_ids)
    info = method.report_info()
    assert [im["entity_id"] for im in info["images"]] == [r.id for r in bench.forget]
    optim = method.optim(OptimConfig(lr=1.0, steps=99, batch_size=32))
    assert (optim.lr, optim.batch_size, optim.steps) == (3e-4, 4, 6 * len(bench.forget))


def test_unknown_loss_impl_is_a_config_error():
    from dsunlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="siu_loss"):
        build_method("siu", MethodConfig(siu_loss="fast"))


# ------------------------------------------------------------------------- 2 ZeRO-3 ranks


def _run_siu(impl: str, tmp_path: Path, bench_dir: Path, vanilla: Path) -> Path:
    args = [
        "unlearn",
        "--config",
        "configs/demo.yaml",
        f"name={impl}",
        f"out_dir={tmp_path}",
        f"data.path={bench_dir}",
        f"vanilla={vanilla}",
        "methods=[siu]",
        f"method.siu_loss={impl}",
        "method.siu_steps=3",
        "eval.enabled=false",
        "checkpoint.final=true",
        f"deepspeed={DS_CONFIG}",
    ]
    # The Triton kernel itself runs (interpreted on CPU) in the fused run.
    proc = run_deepspeed(2, args, cwd=REPO, timeout=600, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path / impl


@pytest.mark.slow
def test_two_ranks_fused_matches_eager_after_three_steps(tmp_path, small_bench):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    vanilla = save_random_tiny("tiny-llava", tmp_path / "vanilla")
    runs = {impl: _run_siu(impl, tmp_path, small_bench, vanilla) for impl in ("eager", "fused")}
    reports = {k: json.loads((v / "report.json").read_text()) for k, v in runs.items()}
    assert reports["fused"]["world_size"] == 2
    assert reports["fused"]["method_info"]["siu"]["loss_impl"] == "fused-triton"
    assert reports["eager"]["method_info"]["siu"]["loss_impl"] == "eager"
    curves = {k: json.loads((v / "losses.json").read_text())["siu"] for k, v in runs.items()}
    assert len(curves["fused"]) == 3
    for a, b in zip(curves["eager"], curves["fused"], strict=True):
        assert abs(a["forget_loss"] - b["forget_loss"]) <= 1e-5 * max(1.0, abs(a["forget_loss"]))

    weights = {
        k: get_fp32_state_dict_from_zero_checkpoint(str(v / "checkpoints" / "siu"))
        for k, v in runs.items()
    }
    assert set(weights["eager"]) == set(weights["fused"])
    worst = max(
        (weights["eager"][k] - weights["fused"][k]).abs().max().item() for k in weights["eager"]
    )
    print(f"max |w_eager - w_fused| after 3 steps = {worst:.3g}")
    assert worst <= 2e-5
    # The partitioned lm_head did get its gradient through the gathered fused op.
    start = load_file(str(next(vanilla.glob("*.safetensors"))))
    head0 = next(v for k, v in start.items() if k.endswith("lm_head.weight"))
    moved = (weights["fused"]["lm_head.weight"] - head0).abs().max().item()
    assert moved > 1e-4


def test_views_augment_only_with_the_flag(bench):
    import numpy as np

    plain = build_method("siu", MethodConfig())
    samples = plain.forget_examples(bench, build_tiny_processor("tiny-llava"))[:10]
    rng = np.random.default_rng(0)
    assert plain.views(samples, rng) == samples
    aug = build_method("siu", MethodConfig(siu_augment=True))
    views = aug.views(samples, rng)
    assert [(v.question, v.answer, v.target_phrase) for v in views] == [
        (s.question, s.answer, s.target_phrase) for s in samples
    ]
    for v, s in zip(views, samples, strict=True):
        if s.image is None:
            assert v.image is None
        else:
            assert v.image.size == s.image.size
            assert np.asarray(v.image).tolist() != np.asarray(s.image).tolist()
