"""Model scoring that every rank takes part in, so it works on ZeRO-3 sharded weights.

One primitive, `sharded_map`, serves every scoring loop: items are split over ranks, each rank
runs the same number of batches (short ranks repeat item 0 and drop the result), because under
ZeRO-3 each forward gathers parameters collectively; the per-item values are then gathered to
every rank in item order. Option scores, greedy answers and teacher-forced answer scores are
`sharded_map` with a different per-batch function. Teacher-forced scores take the answer rows'
hidden states and the gathered head (`models.lm_head.teacher_forced`): no [B, T, V] logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from dsunlearn.engine.batches import shard_for_rank, to_device
from dsunlearn.engine.dist import DistInfo
from dsunlearn.models.encode import encode_for_generation, encode_for_loss
from dsunlearn.models.lm_head import TeacherForced, teacher_forced

T = TypeVar("T")
V = TypeVar("V")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """`model.eval()` for the block (no dropout while scoring), then its former mode again."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def sharded_map(
    items: Sequence[T],
    per_rank_batch: int,
    info: DistInfo,
    fn: Callable[[list[T], list[int]], list[V]],
) -> list[V]:
    """`fn(batch, rows)` -> one value per item of `batch` (`rows`: their indices in `items`),
    over every item, sharded over ranks; the values come back on every rank, in item order.
    All ranks must call this together. Padded rows (item 0 again) run and are dropped."""
    import torch.distributed as dist

    local: dict[int, V] = {}
    for idxs in shard_for_rank(len(items), per_rank_batch, info.rank, info.world_size):
        rows = [i if i >= 0 else 0 for i in idxs]
        values = fn([items[i] for i in rows], rows)
        for i, v in zip(idxs, values, strict=True):
            if i >= 0:
                local[i] = v
    if info.world_size > 1:
        parts: list[dict[int, V]] = [{} for _ in range(info.world_size)]
        dist.all_gather_object(parts, local)
        for p in parts:
            local.update(p)
    if len(local) != len(items):
        raise RuntimeError(f"sharded_map scored {len(local)} of {len(items)} items")
    return [local[i] for i in range(len(items))]


def option_scores(
    model: Any, processor: Any, items: Sequence[Any], per_rank_batch: int, info: DistInfo
) -> list[list[float]]:
    """Each multiple-choice item's options scored by their mean token log-likelihood (the mean,
    not the sum, keeps options of different lengths comparable): one list per item."""

    def fn(batch: list[Any], _rows: list[int]) -> list[list[float]]:
        qs, ims, opts, counts = [], [], [], []
        for it in batch:
            counts.append(len(it.options))
            for opt in it.options:
                qs.append(it.question)
                ims.append(it.image)
                opts.append(opt)
        enc = to_device(encode_for_loss(processor, qs, ims, opts), info.device)
        with teacher_forced(model, enc) as tf:
            rows = tf.rows
            mean_lp = rows.per_example_sum(tf.stats().logprob) / rows.counts().clamp(min=1)
        return [chunk.tolist() for chunk in torch.split(mean_lp.cpu(), counts)]

    return sharded_map(items, per_rank_batch, info, fn)


def picked_correctly(scores: Sequence[Sequence[float]], items: Sequence[Any]) -> list[bool]:
    """Whether each item's highest-scoring option is its right one (first maximum on ties)."""
    return [
        int(torch.tensor(s).argmax()) == it.answer_index
        for s, it in zip(scores, items, strict=True)
    ]


def score_multiple_choice(
    model: Any, processor: Any, items: Sequence[Any], per_rank_batch: int, info: DistInfo
) -> list[bool]:
    """For each question, whether the option with the highest mean log-likelihood is right."""
    return picked_correctly(option_scores(model, processor, items, per_rank_batch, info), items)


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
    tok = getattr(processor, "tokenizer", processor)

    def fn(batch: list[Any], _rows: list[int]) -> list[str]:
        enc = encode_for_generation(
            processor, [it.question for it in batch], [it.image for it in batch]
        )
        enc = to_device(enc, info.device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # Under ZeRO-3 a rank that finished early must keep joining the gathers.
            synced_gpus=zero3 and info.world_size > 1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    return sharded_map(items, per_rank_batch, info, fn)


def map_answer_rows(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    answers: Sequence[str],
    per_rank_batch: int,
    info: DistInfo,
    fn: Callable[[TeacherForced, list[int]], list[Any]],
) -> list[Any]:
    """`fn(scored, rows)` -> one value per row, for every (item's question + image,
    `answers[i]`) teacher-forced (`scored`: the batch's answer rows with the head gathered,
    `models.lm_head.TeacherForced`; `rows`: each row's item index); gathered in item order."""
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items for {len(answers)} answers")

    def batch_fn(batch: list[Any], rows: list[int]) -> list[Any]:
        enc = encode_for_loss(
            processor,
            [it.question for it in batch],
            [it.image for it in batch],
            [answers[i] for i in rows],
        )
        enc = to_device(enc, info.device)
        with teacher_forced(model, enc) as tf:
            return fn(tf, rows)

    return sharded_map(items, per_rank_batch, info, batch_fn)


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
    summed over every answer (teacher forcing, labels from `encode_for_loss`).

    `skip_ids[i]`, when given, are vocabulary ids left out of row i's labels (FLU leaves out
    the entity's name tokens, `siu.name_token_ids`, which holds no special token: the final
    EOS stays scored, so even an empty answer scores one token).
    """
    if skip_ids is not None and len(skip_ids) != len(items):
        raise ValueError("items, answers and skip_ids must have the same length")

    def fn(tf: TeacherForced, rows: list[int]) -> list[tuple[float, int]]:
        lp = tf.stats().logprob
        labels, example = tf.rows.labels.to(lp.device), tf.rows.example.to(lp.device)
        keep = torch.ones_like(lp, dtype=torch.bool)
        if skip_ids is not None:
            for r, i in enumerate(rows):
                if skip_ids[i]:
                    skip = torch.tensor(list(skip_ids[i]), device=lp.device)
                    keep &= ~((example == r) & torch.isin(labels, skip))
        nll = -tf.rows.per_example_sum(torch.where(keep, lp, torch.zeros_like(lp)))
        counts = tf.rows.per_example_sum(keep.float()).long()
        return list(zip(nll.cpu().to(torch.float64).tolist(), counts.tolist(), strict=True))

    per_row = map_answer_rows(model, processor, items, answers, per_rank_batch, info, fn)
    return float(sum(n for n, _ in per_row)), float(sum(c for _, c in per_row))
