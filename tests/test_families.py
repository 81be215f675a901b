"""Every built-in tiny family through the same code path: chat-template prompts, encode, forward,
loss and backward, generation, save/reload, module groups from the family table, LoRA targets,
and the one-line refusal of an unsupported architecture; ZeRO-3 (1 rank) for the newer ones."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from dsunlearn.config import LoraConfig
from dsunlearn.data.faces import choose_identities, render_face
from dsunlearn.errors import ModelError
from dsunlearn.models import (
    IGNORE_INDEX,
    TINY_MODELS,
    build_prompt,
    encode_for_generation,
    encode_for_loss,
    load_model_and_processor,
    module_group,
    save_model_and_processor,
    sequence_nll,
)
from dsunlearn.models.encode import final_hidden_states
from dsunlearn.models.families import FAMILIES as TABLE
from dsunlearn.models.families import GROUPS, family_of, family_of_arch, family_of_config
from dsunlearn.models.loader import block_linears
from dsunlearn.models.lora import apply_lora, default_lora_targets
from tests.conftest import zero3_build_and_step

FAMILIES = list(TINY_MODELS)  # tiny-llava, tiny-qwen2-vl, tiny-llava-next, tiny-idefics3
NEW_FAMILIES = ["tiny-llava-next", "tiny-idefics3"]
SUPPORTED = [a for f in TABLE for a in f.architectures]

# What each processor writes for one 32x32 benchmark image.
IMAGE_TOKENS = {
    "tiny-llava": 16,  # 4x4 patches
    "tiny-qwen2-vl": 16,  # 8x8 patches, 2x2 merge
    "tiny-llava-next": 88,  # 4x4 base view + 8x8 grid of the 2x2 crops + 8 row ends
    "tiny-idefics3": 20,  # (2x2 tiles + global view) x 4 pixel-shuffled tokens
}


@cache
def _loaded(name: str):
    return load_model_and_processor(name, seed=0)


@cache
def _faces() -> tuple[Image.Image, Image.Image]:
    """Two of the built-in benchmark's portraits (PIL RGB, 32x32)."""
    rng = np.random.default_rng(0)
    a, b = choose_identities(2, rng)
    return render_face(a, rng), render_face(b, rng)


def _mixed() -> tuple[list[str], list[Image.Image | None], list[str]]:
    """Image rows, a text-only row and a non-square image, in one batch."""
    face_a, face_b = _faces()
    wide = face_b.resize((48, 24))
    questions = ["Who is this person?", "Where was Alder Quinby born?", "What is this hobby?"]
    return questions, [face_a, None, wide], ["Alder Quinby", "Port Velin", "playing chess"]


def _n_image_tokens(processor, ids: torch.Tensor) -> torch.Tensor:
    return (ids == processor.image_token_id).sum(dim=-1)


def test_every_builtin_is_in_the_family_table():
    names = {f.name for f in TABLE}
    assert {"LLaVA-1.5", "LLaVA-NeXT", "Qwen2-VL", "Idefics3"} <= names
    for name, spec in TINY_MODELS.items():
        family = family_of_arch(spec.architecture)
        model, _ = _loaded(name)
        assert type(model).__name__ == spec.architecture
        assert family_of(model) is family is family_of_config(model.config)
        assert model.config.model_type in family.model_types


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_come_from_the_processors_chat_template(name):
    _, processor = _loaded(name)
    q = "Where was this person born?"
    for has_image in (True, False):
        content = [{"type": "image"}] if has_image else []
        expected = processor.apply_chat_template(
            [{"role": "user", "content": [*content, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt = build_prompt(processor, q, has_image)
        assert prompt == expected and q in prompt
        assert prompt.count(processor.image_token) == int(has_image)
    if name == "tiny-llava-next":
        assert build_prompt(processor, q, True) == f"[INST] <image>\n{q} [/INST]"
        assert build_prompt(processor, q, False) == f"[INST] {q} [/INST]"
    if name == "tiny-idefics3":
        assert build_prompt(processor, q, True) == f"User:<image>{q}<end_of_utterance>\nAssistant:"
        assert build_prompt(processor, q, False) == f"User: {q}<end_of_utterance>\nAssistant:"

    # Processor expansion: an image question gets the family's placeholders, a text one none.
    questions, images, _ = _mixed()
    enc = encode_for_generation(processor, questions, images)
    counts = _n_image_tokens(processor, enc["input_ids"]).tolist()
    assert counts[0] == IMAGE_TOKENS[name] and counts[1] == 0 and counts[2] > 0
    tok = processor.tokenizer
    assert tok.unk_token_id not in enc["input_ids"][enc["attention_mask"].bool()].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_loss_and_backward_on_a_mixed_batch(name):
    model, processor = _loaded(name)
    questions, images, answers = _mixed()
    batch = encode_for_loss(processor, questions, images, answers)
    tok = processor.tokenizer
    for i, answer in enumerate(answers):  # labels: exactly the answer and EOS
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert labelled == tok(" " + answer, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
    assert _n_image_tokens(processor, batch["input_ids"]).tolist()[1] == 0

    model.train()
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    nll = sequence_nll(out.logits, batch["labels"])
    n_tok = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    assert torch.allclose((nll * n_tok).sum() / n_tok.sum(), out.loss, atol=1e-5)
    with torch.no_grad():  # the fused SIU loss's input: what the output head multiplies
        hidden = final_hidden_states(model, batch)
        head = model.get_output_embeddings()
        assert torch.allclose(head(hidden), out.logits, atol=1e-5)
    out.loss.backward()
    arch = type(model).__name__
    by_group: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
    for n, p in model.named_parameters():
        by_group[module_group(arch, n)].append(p)
    for group, params in by_group.items():  # the loss reaches every part
        with_grad = [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]
        assert len(with_grad) > 0.9 * len(params), (group, len(with_grad), len(params))
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_generation_matches_single_rows(name):
    model, processor = _loaded(name)
    questions, images, _ = _mixed()
    enc = encode_for_generation(processor, questions, images)
    assert enc["attention_mask"][:, -1].eq(1).all()  # left padding
    model.eval()
    kw = {"max_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        batched = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1] :]
        for i in range(len(questions)):
            one = encode_for_generation(processor, [questions[i]], [images[i]])
            single = model.generate(**one, **kw)[:, one["input_ids"].shape[1] :]
            assert batched[i].tolist() == single[0].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_reload_gives_equal_logits(name, tmp_path):
    model, processor = _loaded(name)
    out = save_model_and_processor(model, processor, tmp_path / "ckpt")
    model2, processor2 = load_model_and_processor(str(out))
    assert type(model2) is type(model) and type(processor2) is type(processor)
    args = _mixed()
    batch, batch2 = encode_for_loss(processor, *args), encode_for_loss(processor2, *args)
    assert batch.keys() == batch2.keys()
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    model.eval()
    model2.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch).logits)


def _check_groups(model) -> None:
    """Every parameter in exactly one group, every group and every table prefix used."""
    arch = type(model).__name__
    family = family_of_arch(arch)
    names = [n for n, _ in model.named_parameters()]
    groups = [module_group(arch, n) for n in names]
    assert set(groups) == set(GROUPS)
    assert sum(groups.count(g) for g in GROUPS) == len(names)
    parts = {family.part(n) for n in names}
    assert parts == {"vision", "projector", "language", "lm_head"}
    for prefixes in family.prefixes().values():  # no stale prefix in the table
        for prefix in prefixes:
            assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix
    head = next(n for n in names if family.part(n) == "lm_head")
    assert module_group(arch, head) == "language"
    assert module_group(arch, "module.base_model.model." + head) == "language"


def _check_block_linears(model) -> None:
    head = model.get_output_embeddings()
    linears = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    ]
    blocks = block_linears(model)
    assert blocks and sorted(blocks) == sorted(linears)  # the table misses no Linear
    arch = type(model).__name__
    assert {module_group(arch, b + ".weight") for b in blocks} == set(GROUPS)
    family = family_of_arch(arch)
    for b in blocks:  # layer numbers (saliency heat maps): every block Linear but the projector's
        assert (family.layer(b) is None) == (family.part(b + ".weight") == "projector"), b


@pytest.mark.parametrize("name", FAMILIES)
def test_module_groups_and_block_linears_come_from_the_table(name):
    model, _ = _loaded(name)
    _check_groups(model)
    _check_block_linears(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_targets_the_language_models_linears_only(name):
    model, processor = _loaded(name)
    arch = type(model).__name__
    family = family_of(model)
    targets = default_lora_targets(model)
    language_linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and family.part(n + ".weight") == "language"
    ]
    assert targets and sorted(targets) == sorted(language_linears)
    assert all(module_group(arch, t + ".weight") == "language" for t in targets)
    assert not any(family.part(t + ".weight") == "lm_head" or "lm_head" in t for t in targets)

    fresh, _ = load_model_and_processor(name, seed=0)  # peft changes the model in place
    wrapped = apply_lora(fresh, LoraConfig(r=4))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets)
    batch = encode_for_loss(processor, *_mixed())
    loss = wrapped(**batch).loss
    loss.backward()
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)


def test_table_only_family_qwen2_5_vl_layout():
    """Qwen2.5-VL has no tiny build; its table entry is checked on a meta-device model."""
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [1],
        },
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    _check_groups(model)
    _check_block_linears(model)


def _assert_lists_supported(message: str) -> None:
    assert "\n" not in message and "unsupported architecture" in message
    assert all(arch in message for arch in SUPPORTED)


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    tiny_llama = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(tiny_llama)
    model.save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelError) as e:
        load_model_and_processor(str(tmp_path / "llama"))
    _assert_lists_supported(str(e.value))
    assert "LlamaForCausalLM" in str(e.value) and str(tmp_path / "llama") in str(e.value)

    for call in (
        lambda: module_group("LlamaForCausalLM", "lm_head.weight"),
        lambda: block_linears(model),
        lambda: default_lora_targets(model),
    ):
        with pytest.raises(ModelError) as e:
            call()
        _assert_lists_supported(str(e.value))


@pytest.mark.slow
def test_zero3_one_rank_build_and_step():
    """World size 1 over gloo, every family of NEW_FAMILIES in turn in one subprocess (so
    torch.distributed state cannot leak into this one): built partitioned with the same
    weights as without ZeRO, and two optimizer steps lower the loss."""
    reported = zero3_build_and_step(NEW_FAMILIES)
    for name in NEW_FAMILIES:
        model, _ = _loaded(name)
        total = sum(p.numel() for p in model.parameters())
        assert reported.get(name) == total, (name, reported)
