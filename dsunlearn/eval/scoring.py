"""Model scoring that every rank takes part in, so it works on ZeRO-3 sharded weights.

Items are split over ranks; each rank runs the same number of forward passes (short ranks
repeat item 0 and drop the result), because under ZeRO-3 each forward gathers parameters
collectively. Results are summed over ranks so every rank ends with the full answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsunlearn.engine.batches import shard_for_rank, to_device
from dsunlearn.engine.dist import DistInfo, all_reduce_sum
from dsunlearn.models.encode import (
    IGNORE_INDEX,
    encode_for_generation,
    encode_for_loss,
    logits_of,
    sequence_logprob_sum,
    sequence_nll,
)


@torch.no_grad()
def score_multiple_choice(
    model: Any, processor: Any, items: Sequence[Any], per_rank_batch: int, info: DistInfo
) -> list[bool]:
    """For each question, pick the option with the highest mean token log-likelihood.

    The mean (not the sum) keeps options of different lengths comparable.
    """
    n = len(items)
    correct = torch.zeros(n, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.float64)
    for idxs in shard_for_rank(n, per_rank_batch, info.rank, info.world_size):
        real = [i if i >= 0 else 0 for i in idxs]
        qs, ims, opts, counts = [], [], [], []
        for i in real:
            it = items[i]
            counts.append(len(it.options))
            for opt in it.options:
                qs.append(it.question)
                ims.append(it.image)
                opts.append(opt)
        batch = to_device(encode_for_loss(processor, qs, ims, opts), info.device)
        scores = -sequence_nll(logits_of(model, batch), batch["labels"]).cpu()
        for i, chunk in zip(idxs, torch.split(scores, counts), strict=True):
            if i >= 0:
                correct[i] = float(int(chunk.argmax()) == items[i].answer_index)
                seen[i] = 1.0
    correct, seen = all_reduce_sum(correct), all_reduce_sum(seen)
    assert bool((seen == 1).all()), "every item must be scored exactly once"
    return [bool(c) for c in correct.tolist()]


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    per_rank_batch: int,
    max_new_tokens: int,
    info: DistInfo,
    zero3: bool,
) -> list[str]:
    """Greedy answers for every item, gathered to all ranks in item order."""
    import torch.distributed as dist

    tok = getattr(processor, "tokenizer", processor)
    local: dict[int, str] = {}
    for idxs in shard_for_rank(len(items), per_rank_batch, info.rank, info.world_size):
        real = [i if i >= 0 else 0 for i in idxs]
        batch = encode_for_generation(
            processor, [items[i].question for i in real], [items[i].image for i in real]
        )
        batch = to_device(batch, info.device)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # Under ZeRO-3 a rank that finished early must keep joining the gathers.
            synced_gpus=zero3 and info.world_size > 1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        for i, t in zip(idxs, texts, strict=True):
            if i >= 0:
                local[i] = t.strip()
    if info.world_size > 1:
        parts: list[dict[int, str]] = [{} for _ in range(info.world_size)]
        dist.all_gather_object(parts, local)
        for p in parts:
            local.update(p)
    return [local[i] for i in range(len(items))]


@torch.no_grad()
def answer_nll(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    answers: Sequence[str],
    per_rank_batch: int,
    info: DistInfo,
    skip_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[float, float]:
    """(sum of NLL, number of scored tokens) of `answers[i]` given item i's question and image,
    summed over every answer and every rank (teacher forcing, labels from `encode_for_loss`).

    `skip_ids[i]`, when given, are vocabulary ids left out of row i's labels (FLU leaves out
    the entity's name tokens, `siu.name_token_ids`, which holds no special token: the final
    EOS stays scored, so even an empty answer scores one token).
    """
    if len(items) != len(answers) or (skip_ids is not None and len(skip_ids) != len(items)):
        raise ValueError("items, answers and skip_ids must have the same length")
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    for idxs in shard_for_rank(len(items), per_rank_batch, info.rank, info.world_size):
        real = [i if i >= 0 else 0 for i in idxs]  # padded rows run (ZeRO-3), then are dropped
        batch = encode_for_loss(
            processor,
            [items[i].question for i in real],
            [items[i].image for i in real],
            [answers[i] for i in real],
        )
        if skip_ids is not None:
            labels = batch["labels"]
            for row, i in enumerate(real):
                if skip_ids[i]:
                    drop = torch.isin(labels[row], torch.tensor(list(skip_ids[i])))
                    labels[row, drop] = IGNORE_INDEX
        keep = torch.tensor([i >= 0 for i in idxs], dtype=torch.float64)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).to(torch.float64)
        batch = to_device(batch, info.device)
        row_nll = -sequence_logprob_sum(logits_of(model, batch), batch["labels"]).cpu()
        nll += (row_nll.to(torch.float64) * keep).sum()
        tokens += (counts * keep).sum()
    nll, tokens = all_reduce_sum(nll.to(info.device)), all_reduce_sum(tokens.to(info.device))
    return float(nll.item()), float(tokens.item())
