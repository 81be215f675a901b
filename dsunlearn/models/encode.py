"""Turn (image, question[, answer]) examples into model inputs, and score answers.

One code path for every family: the processor's chat template writes the prompt and the
processor expands each image placeholder to one token per visual feature, so the same encoder
serves tiny and real LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Idefics3 models. Image and text-only
rows can share a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers.processing_utils import ProcessorMixin

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, image tokens, padding)
_NOT_MODEL_INPUTS = ("labels", "token_mask")

# Inputs whose rows follow the text rows (padded with the text) vs. vision inputs, passed on as
# the processor made them: per image (pixel_values; Qwen2-VL's image_grid_thw; LLaVA-NeXT's
# image_sizes) or per row (Idefics3's pixel_values and pixel_attention_mask, [B, views, ...]).
_PER_TOKEN_KEYS = ("mm_token_type_ids",)
_PER_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")


def build_prompt(processor: ProcessorMixin, question: str, has_image: bool) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts."""
    content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _check_lengths(**columns: Sequence[Any]) -> int:
    sizes = {k: len(v) for k, v in columns.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch columns differ in length: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("empty batch")
    return n


def _encode_prompts(
    processor: ProcessorMixin,
    questions: Sequence[str],
    images: Sequence[Image.Image | None],
    padding_side: str,
) -> dict[str, torch.Tensor]:
    """One processor call for the whole batch: prompts, expanded image tokens, pixel values."""
    prompts = [
        build_prompt(processor, q, img is not None)
        for q, img in zip(questions, images, strict=True)
    ]
    present = [img for img in images if img is not None]  # in row order, as the model expects
    return dict(
        processor(
            images=present or None,
            text=prompts,
            padding=True,
            padding_side=padding_side,
            return_tensors="pt",
        )
    )


def encode_for_loss(
    processor: ProcessorMixin,
    questions: Sequence[str],
    images: Sequence[Image.Image | None],
    answers: Sequence[str],
    target_phrases: Sequence[str | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + answer + EOS, with labels only on the answer and EOS.

    Labels are aligned with `input_ids` (the models shift them inside). Returns input_ids,
    attention_mask, labels, and where the batch has images pixel_values (+ image_grid_thw and
    mm_token_type_ids for Qwen2-VL, whose M-RoPE needs them; image_sizes for LLaVA-NeXT;
    pixel_attention_mask for Idefics3).

    With `target_phrases` (one per row, None for none) it also returns `token_mask` [B, T] bool:
    True on every answer token that overlaps the row's phrase (character offsets of the very
    tokenisation used for the labels, so a phrase tokenised differently inside a sentence than
    alone is still masked exactly).
    """
    n = _check_lengths(questions=questions, images=images, answers=answers)
    if target_phrases is not None:
        _check_lengths(answers=answers, target_phrases=target_phrases)
    tok = processor.tokenizer
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError("the tokenizer needs an EOS and a PAD token")
    enc = _encode_prompts(processor, questions, images, padding_side="right")
    prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
    answer_texts = [" " + a for a in answers]
    answer_enc = tok(
        answer_texts, add_special_tokens=False, return_offsets_mapping=target_phrases is not None
    )
    answer_ids = answer_enc["input_ids"]

    rows = [
        enc["input_ids"][i, : prompt_lens[i]].tolist() + answer_ids[i] + [tok.eos_token_id]
        for i in range(n)
    ]
    width = max(len(r) for r in rows)
    input_ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, prompt_lens[i] : len(row)] = input_ids[i, prompt_lens[i] : len(row)]

    out: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
    }
    if target_phrases is not None:
        out["token_mask"] = torch.zeros((n, width), dtype=torch.bool)
        for i, phrase in enumerate(target_phrases):
            for j in phrase_token_positions(
                answer_texts[i], answer_enc["offset_mapping"][i], phrase
            ):
                out["token_mask"][i, prompt_lens[i] + j] = True
    for key in _PER_TOKEN_KEYS:  # prompt part from the processor, zeros (text) elsewhere
        if key in enc:
            col = torch.zeros((n, width), dtype=enc[key].dtype)
            for i in range(n):
                col[i, : prompt_lens[i]] = enc[key][i, : prompt_lens[i]]
            out[key] = col
    for key in _PER_IMAGE_KEYS:
        if key in enc:
            out[key] = enc[key]
    return out


def phrase_token_positions(
    text: str, offsets: Sequence[tuple[int, int]], phrase: str | None
) -> list[int]:
    """Indices of the tokens (given by their character `offsets` in `text`) that overlap the
    first occurrence of `phrase`; [] for no phrase. A phrase that is not in the text is an error:
    silently masking nothing would leave the KL pulling the target back to the original."""
    if not phrase:
        return []
    start = text.find(phrase)
    if start < 0:
        raise ValueError(f"target phrase {phrase!r} is not in the answer {text.strip()!r}")
    end = start + len(phrase)
    return [j for j, (s, e) in enumerate(offsets) if s < end and e > start and e > s]


def encode_for_generation(
    processor: ProcessorMixin,
    questions: Sequence[str],
    images: Sequence[Image.Image | None],
) -> dict[str, torch.Tensor]:
    """Left-padded prompts (so every row's next token is at the end) for `model.generate`."""
    _check_lengths(questions=questions, images=images)
    enc = _encode_prompts(processor, questions, images, padding_side="left")
    keep = ("input_ids", "attention_mask", *_PER_TOKEN_KEYS, *_PER_IMAGE_KEYS)
    return {k: v for k, v in enc.items() if k in keep}


def encode_examples(
    processor: ProcessorMixin, examples: Sequence[Any], *, for_generation: bool = False
) -> dict[str, torch.Tensor]:
    """Duck-typed convenience: examples with `.question`, `.image` and (for loss) `.answer`."""
    questions = [ex.question for ex in examples]
    images = [ex.image for ex in examples]
    if for_generation:
        return encode_for_generation(processor, questions, images)
    phrases = None  # examples with a `target_phrase` (SIU) also get a token mask
    if all(hasattr(ex, "target_phrase") for ex in examples):
        phrases = [ex.target_phrase for ex in examples]
    return encode_for_loss(processor, questions, images, [ex.answer for ex in examples], phrases)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the entries that are ours, not the model's (labels, token mask)."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def logits_of(model: Callable[..., Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward without labels (we compute our own per-example losses); fp32 logits."""
    return model(**model_inputs(batch)).logits.float()


def hf_model(model: Any) -> torch.nn.Module:
    """The transformers model inside DeepSpeed (`.module`) and peft (`get_base_model`) wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def final_hidden_states(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last (normed) hidden states [B, T, H]: what `lm_head` would multiply.

    The whole model is called, so engines and ZeRO-3 hooks see an ordinary forward, but with
    `logits_to_keep=1`: the [B, T, V] logits a fused loss exists to avoid are never built. The
    states are taken from the output of the backbone (`model.base_model`, i.e. `model.model`
    in every supported family), whose first output is the normed last hidden state.
    """
    hf = hf_model(model)
    backbone = getattr(hf, "base_model", None)
    if backbone is None or backbone is hf:
        raise TypeError(f"{type(hf).__name__} has no separate backbone to take states from")
    return module_output(model, batch, backbone)


def module_output(model: Any, batch: dict[str, torch.Tensor], module: torch.nn.Module):
    """The (first) output tensor of `module` in one forward of `model` with `logits_to_keep=1`:
    a backbone's last hidden states, or a decoder layer's residual stream (RMU)."""
    captured: list[torch.Tensor] = []

    def hook(_m, _a, out):
        captured.append(out if isinstance(out, torch.Tensor) else out[0])

    handle = module.register_forward_hook(hook)
    try:
        model(**model_inputs(batch), logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"expected one call of the hooked module per forward, saw {len(captured)}"
        )
    return captured[0]


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum of answer-token NLL, answer-token count), next-token shifted like the models.

    Only labelled positions are upcast to fp32 and normalised: a full-vocabulary fp32
    log-softmax over every position would cost B*T*V floats for nothing.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(logits.device)
    mask = shift_labels != IGNORE_INDEX
    rows = torch.nonzero(mask, as_tuple=True)[0]
    nll = F.cross_entropy(shift_logits[mask].float(), shift_labels[mask], reduction="none")
    batch = labels.shape[0]
    sums = torch.zeros(batch, dtype=torch.float32, device=logits.device).index_add(0, rows, nll)
    counts = mask.sum(dim=1)
    return sums, counts


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL of the answer tokens, [B] fp32 (0 for a row without answer tokens)."""
    sums, counts = _token_nll(logits, labels)
    return sums / counts.clamp(min=1).to(sums.dtype)


def sequence_logprob_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of answer-token log-probabilities, [B] fp32: log p(answer | prompt)."""
    sums, _ = _token_nll(logits, labels)
    return -sums
