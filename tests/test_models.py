"""Tiny model families: build, encode, forward/generate, save/reload, ZeRO-3 init, learnability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from dsunlearn.data import siu_templates
from dsunlearn.data.vocab import (
    EXTRA_WORDS,
    FACTS,
    FIRST_NAMES,
    IDENTITY_QUESTIONS,
    LAST_NAMES,
    split_words,
    tiny_vocabulary,
)
from dsunlearn.errors import ModelError
from dsunlearn.models import (
    IGNORE_INDEX,
    MODULE_GROUPS,
    TINY_MODELS,
    build_prompt,
    encode_for_generation,
    encode_for_loss,
    load_model_and_processor,
    module_group,
    pick_attn_implementation,
    save_model_and_processor,
    sequence_logprob_sum,
    sequence_nll,
)
from dsunlearn.models.tiny import QWEN_SPECIALS, TINY_BPE_VOCAB_SIZE, build_tiny_bpe_tokenizer
from tests.conftest import zero3_build_and_step

FAMILIES = sorted(TINY_MODELS)
WORD_LEVEL = ("tiny-llava", "tiny-llava-next")  # the others use byte-level BPE
# pixel_values rows of `mixed_batch` (2 images, 3 rows): per image, per Qwen2-VL patch (8x8 per
# image), or per text row (Idefics3: [rows, views, C, H, W]).
PIXEL_ROWS = {"tiny-llava": 2, "tiny-qwen2-vl": 2 * 64, "tiny-llava-next": 2, "tiny-idefics3": 3}
REPO = Path(__file__).resolve().parents[1]


def face(i: int) -> Image.Image:
    """A plain background with a coloured disc: easy for a from-scratch ViT to tell apart."""
    im = Image.new("RGB", (32, 32), (240, 240, 240))
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30),
               (200, 30, 200), (30, 200, 200), (90, 90, 90), (150, 80, 20)]  # fmt: skip
    ImageDraw.Draw(im).ellipse([6 + i % 3, 6, 26, 26 - i % 2], fill=colours[i % 8])
    return im


@cache
def _loaded(name: str):
    return load_model_and_processor(name, seed=0)


def mixed_batch() -> tuple[list[str], list[Image.Image | None], list[str]]:
    questions = [
        "Who is this person?",
        "Where was Alder Quinby born?",
        "What is this person's hobby?",
    ]
    images = [face(0), None, face(1)]
    answers = ["Alder Quinby", "Port Velin", "playing chess"]
    return questions, images, answers


def n_image_tokens(processor) -> int:
    """Placeholders the processor writes for one 32x32 image."""
    enc = encode_for_generation(processor, ["Who is this person?"], [face(0)])
    return int((enc["input_ids"] == processor.image_token_id).sum())


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_batch_forward_loss_and_grads(name):
    model, processor = _loaded(name)
    batch = encode_for_loss(processor, *mixed_batch())
    assert batch["pixel_values"].shape[0] == PIXEL_ROWS[name]
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    # The model's loss is the token-weighted mean of our per-row NLL.
    nll = sequence_nll(out.logits, batch["labels"])
    n_tok = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    assert torch.allclose((nll * n_tok).sum() / n_tok.sum(), out.loss, atol=1e-5)
    assert torch.allclose(
        sequence_logprob_sum(out.logits, batch["labels"]), -nll * n_tok, atol=1e-4
    )
    out.loss.backward()
    vision = [
        p for n, p in model.named_parameters() if module_group(type(model).__name__, n) == "vision"
    ]
    assert sum(p.grad is not None for p in vision) > 0.9 * len(vision)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])  # the others: test_families
def test_image_placeholders_equal_patch_count(name):
    model, processor = _loaded(name)
    assert n_image_tokens(processor) == 16
    if name == "tiny-llava":
        vc = model.config.vision_config
        assert (vc.image_size // vc.patch_size) ** 2 == 16 == model.config.image_seq_length
    else:
        enc = encode_for_generation(processor, ["Who is this person?"], [face(0)])
        merge = model.config.vision_config.spatial_merge_size
        assert int(enc["image_grid_thw"].prod()) // merge**2 == 16


@pytest.mark.parametrize("name", FAMILIES)
def test_labels_cover_exactly_answer_and_eos(name):
    _, processor = _loaded(name)
    questions, images, answers = mixed_batch()
    batch = encode_for_loss(processor, questions, images, answers)
    tok = processor.tokenizer
    for i in range(len(questions)):
        prompt = encode_for_generation(processor, [questions[i]], [images[i]])["input_ids"][0]
        answer = tok(" " + answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        row, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        p, a = len(prompt), len(answer)
        assert row[:p].tolist() == prompt.tolist()
        assert labels[:p].eq(IGNORE_INDEX).all()  # prompt and image tokens
        assert labels[p : p + a].tolist() == answer == row[p : p + a].tolist()
        assert labels[p + a :].eq(IGNORE_INDEX).all() and mask[p + a :].eq(0).all()  # padding
        assert mask[: p + a].eq(1).all()
        # Byte-level BPE decodes the leading space that encode_for_loss writes; word-level drops it.
        said = answers[i] if name in WORD_LEVEL else " " + answers[i]
        assert tok.decode(answer, skip_special_tokens=True) == said


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_left_padded_matches_single_rows(name):
    model, processor = _loaded(name)
    questions, images, _ = mixed_batch()
    enc = encode_for_generation(processor, questions, images)
    assert enc["attention_mask"][:, -1].eq(1).all()  # left padding
    assert not enc["attention_mask"][:, 0].all()
    model.eval()
    with torch.no_grad():
        kw = {"max_new_tokens": 3, "do_sample": False}
        batched = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1] :]
        for i in range(len(questions)):
            one = encode_for_generation(processor, [questions[i]], [images[i]])
            single = model.generate(**one, **kw)[:, one["input_ids"].shape[1] :]
            assert batched[i].tolist() == single[0].tolist()
    assert batched.shape == (3, 3)


def test_prompt_text():
    _, llava = _loaded("tiny-llava")
    _, qwen = _loaded("tiny-qwen2-vl")
    q = "Where was this person born?"
    assert build_prompt(llava, q, True) == f"USER: <image> {q} ASSISTANT:"
    assert build_prompt(llava, q, False) == f"USER: {q} ASSISTANT:"
    assert build_prompt(qwen, q, True) == (
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    for proc in (llava, qwen):
        tok = proc.tokenizer
        assert tok.unk_token_id not in tok(build_prompt(proc, q, True))["input_ids"]
    # tiny-llava: every word of the built-in world is one known token, split like split_words.
    tok = llava.tokenizer
    for text in [v for f in FACTS for v in f.values] + [
        f.cloze.format(subject="This person") for f in FACTS
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == split_words(text)
        assert tok.decode(ids) == " ".join(split_words(text))


def _builtin_texts() -> list[str]:
    """Every text of the built-in world: names, fact values and questions, SIU's templates."""
    names = [*FIRST_NAMES, *LAST_NAMES]
    names += [*siu_templates.FABRICATED_FIRST_NAMES, *siu_templates.FABRICATED_LAST_NAMES]
    texts = [*names, *(f"{a} {b}" for a, b in zip(FIRST_NAMES, reversed(LAST_NAMES), strict=True))]
    for f in FACTS:
        texts += [*f.values, f.image_question, f.text_question, f.cloze, f.key]
        texts += [f.text_question.format(name="Jorna Quinby"), f.cloze.format(subject="Ivo Pryce")]
    texts += [*IDENTITY_QUESTIONS, *EXTRA_WORDS, *siu_templates.ALL_TEMPLATES, *tiny_vocabulary()]
    return texts


def _qwen_tokenizer():
    return _loaded("tiny-qwen2-vl")[1].tokenizer


def test_qwen_bpe_round_trips_every_builtin_text():
    tok = _qwen_tokenizer()
    _, qwen = _loaded("tiny-qwen2-vl")
    texts = _builtin_texts()
    texts += [build_prompt(qwen, q, img) for q in IDENTITY_QUESTIONS for img in (True, False)]
    texts += ["  two  spaces\n\ttab", "ünïcödé 🙂", "<|image_pad|>x<|im_end|>\n"]
    for text in texts:
        for t in (text, " " + text):  # as a prompt and as encode_for_loss writes an answer
            ids = tok(t, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, t
            assert tok.decode(ids) == t  # verbatim: no stripped or added spaces


def test_qwen_bpe_is_deterministic():
    """Same corpus, same vocabulary and merges: twice here and once in a fresh process."""
    a, b = build_tiny_bpe_tokenizer(QWEN_SPECIALS), build_tiny_bpe_tokenizer(QWEN_SPECIALS)
    assert a.get_vocab() == b.get_vocab() == _qwen_tokenizer().get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    script = (
        "import json; from dsunlearn.models.tiny import QWEN_SPECIALS, build_tiny_bpe_tokenizer;"
        "t = build_tiny_bpe_tokenizer(QWEN_SPECIALS);"
        "print(json.dumps([t.get_vocab(), t.backend_tokenizer.to_str()]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    vocab, backend = json.loads(proc.stdout.strip().splitlines()[-1])
    assert vocab == a.get_vocab() and backend == a.backend_tokenizer.to_str()
    assert len(a) == TINY_BPE_VOCAB_SIZE


def test_qwen_bpe_word_at_start_differs_from_word_after_space():
    tok = _qwen_tokenizer()

    def pieces(text: str) -> list[str]:
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])

    assert pieces("Jorna") != pieces(" Jorna")
    assert pieces(" Jorna")[0].startswith("Ġ") and not pieces("Jorna")[0].startswith("Ġ")
    assert pieces(" Jorna") == pieces("Who is Jorna")[-len(pieces(" Jorna")) :]
    # Common words are one token; entity names come in several pieces.
    for word in (" the", " is", " person", " born", " picture", "Who", " Who", "Where"):
        assert len(pieces(word)) == 1, (word, pieces(word))
    names = [*FIRST_NAMES, *LAST_NAMES]
    assert sum(len(pieces(" " + n)) > 1 for n in names) > len(names) // 2


def test_qwen_bpe_specials_are_single_ids():
    tok = _qwen_tokenizer()
    specials = [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token, *QWEN_SPECIALS]
    assert specials == ["<pad>", "<unk>", "<s>", "</s>", *QWEN_SPECIALS]
    for i, special in enumerate(specials):  # first ids, in the word-level tokenizer's order
        assert tok.convert_tokens_to_ids(special) == i
        assert tok(special, add_special_tokens=False)["input_ids"] == [i]
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    run = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"  # as the processor writes
    assert tok(run, add_special_tokens=False)["input_ids"] == [6, *[pad] * 16, 7]
    assert (tok.padding_side, tok.model_max_length) == ("right", 256)
    _, processor = _loaded("tiny-qwen2-vl")
    enc = encode_for_generation(processor, ["Who is this person?"], [face(0)])
    ids = enc["input_ids"][0].tolist()
    start = ids.index(6)
    assert ids[start : start + 18] == [6, *[pad] * 16, 7]


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_round_trip(name, tmp_path):
    model, processor = _loaded(name)
    out = save_model_and_processor(model, processor, tmp_path / "ckpt")
    assert (out / "model.safetensors").is_file()
    model2, processor2 = load_model_and_processor(str(out))
    reloaded = AutoProcessor.from_pretrained(out)
    args = mixed_batch()
    batch = encode_for_loss(processor, *args)
    for proc in (processor2, reloaded):
        batch2 = encode_for_loss(proc, *args)
        assert batch.keys() == batch2.keys()
        assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    model.eval()
    model2.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch).logits)


def test_same_seed_same_weights():
    a, _ = load_model_and_processor("tiny-llava", seed=3)
    b, _ = load_model_and_processor("tiny-llava", seed=3)
    c, _ = load_model_and_processor("tiny-llava", seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_unknown_and_bad_models(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network probe
    with pytest.raises(ModelError, match="tiny-llava, tiny-qwen2-vl") as e:
        load_model_and_processor("tiny-llama-does-not-exist")
    assert "tiny-llama-does-not-exist" in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=str(empty)):
        load_model_and_processor(str(empty))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(empty)):
        load_model_and_processor(str(empty))
    with pytest.raises(ModelError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "missing"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectation")
def test_attn_implementation_on_cpu():
    assert pick_attn_implementation() == "sdpa"
    model, _ = _loaded("tiny-llava")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", FAMILIES)
def test_module_groups_cover_every_parameter(name):
    model, _ = _loaded(name)
    arch = type(model).__name__
    assert arch in MODULE_GROUPS
    groups = {module_group(arch, n) for n, _ in model.named_parameters()}
    assert groups == {"vision", "projector", "language"}
    assert module_group(arch, "lm_head.weight") == "language"
    assert module_group(arch, "module.base_model.model.lm_head.weight") == "language"
    with pytest.raises(ModelError):
        module_group("GPT2LMHeadModel", "lm_head.weight")


def test_tiny_llava_learns_image_dependent_answers():
    """Same question, 8 pictures, 8 answers: only the image tells them apart."""
    model, processor = load_model_and_processor("tiny-llava", seed=0)
    model.train()
    fact = FACTS[0]
    images = [face(i) for i in range(8)]
    questions = [fact.image_question] * 8
    answers = list(fact.values[:8])
    batch = encode_for_loss(processor, questions, images, answers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    model.eval()
    enc = encode_for_generation(processor, questions, images)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    said = processor.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum(s == a for s, a in zip(said, answers, strict=True)) >= 7, said


def test_tiny_llava_zero3_init_partitions_parameters():
    """World size 1 over gloo, in a subprocess: built partitioned, same weights as without
    ZeRO, two steps lower the loss (tests/ranks/zero3_build_step.py)."""
    reported = zero3_build_and_step(["tiny-llava"])
    model, _ = _loaded("tiny-llava")
    assert reported == {"tiny-llava": sum(p.numel() for p in model.parameters())}
