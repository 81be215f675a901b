"""Deterministic global batches, split over ranks.

Every rank walks the same seeded permutation and takes its own contiguous slice of each
global batch. With the same seed and global batch, 1 rank and N ranks see exactly the same
examples per optimizer step, which is what makes their loss curves comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to `device` (other values pass through)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def global_batches(
    items: Sequence[T], global_batch: int, rank: int, world_size: int, seed: int
) -> Iterator[list[T]]:
    """An endless stream of this rank's share of each global batch (epochs wrap around)."""
    if not items:
        raise ValueError("no examples to batch")
    per_rank = global_batch // world_size
    epoch = 0
    buffer: list[int] = []
    while True:
        while len(buffer) < global_batch:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            buffer += torch.randperm(len(items), generator=g).tolist()
            epoch += 1
        batch, buffer = buffer[:global_batch], buffer[global_batch:]
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        yield [items[i] for i in mine]


def balanced_batches(
    items: Sequence[T],
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    has_image: Callable[[T], bool] = lambda ex: getattr(ex, "image", None) is not None,
) -> Iterator[list[T]]:
    """Like `global_batches`, but every rank's share of a step holds the same number of image
    examples (at least one whenever both kinds remain possible).

    Under ZeRO-3 a forward gathers each module's parameters collectively and a backward
    reduce-scatters their gradients: a rank whose batch happens to be text-only skips the
    vision tower, and the ranks' collectives no longer match (gloo aborts, NCCL hangs). Data that
    mixes image and text-only examples (SIU's) must be batched like this; single-kind data gets
    exactly `global_batches`.
    """
    images = [x for x in items if has_image(x)]
    texts = [x for x in items if not has_image(x)]
    if not images or not texts:
        yield from global_batches(items, global_batch, rank, world_size, seed)
        return
    per_rank = global_batch // world_size
    if per_rank < 1:
        raise ValueError(f"global batch {global_batch} is smaller than the world size {world_size}")
    share = len(images) / len(items)
    img_stream = global_batches(images, world_size, 0, 1, seed)  # whole steps, sliced below
    txt_stream = global_batches(texts, world_size, 0, 1, seed + 1)
    step_rng = torch.Generator().manual_seed(seed * 100_003 + 7)  # identical on every rank
    while True:
        if per_rank == 1:  # one example per rank: the whole step is one kind
            n_img = int(torch.rand((), generator=step_rng).item() < share)
        else:
            n_img = min(per_rank - 1, max(1, round(per_rank * share)))
        mine: list[T] = []
        for kind_stream, count in ((img_stream, n_img), (txt_stream, per_rank - n_img)):
            for _ in range(count):  # one example per rank per draw, the same draws everywhere
                mine.append(next(kind_stream)[rank])
        yield mine


def shard_for_rank(n: int, per_rank_batch: int, rank: int, world_size: int) -> list[list[int]]:
    """Split indices 0..n-1 into per-rank batches; every rank gets the SAME number of batches.

    Under ZeRO-3 each forward gathers parameters collectively, so a rank that ran out of work
    would hang the others. Short ranks get batches padded with index -1 (to be ignored).
    """
    per_step = per_rank_batch * world_size
    steps = max(1, -(-n // per_step))
    out = []
    for s in range(steps):
        start = s * per_step + rank * per_rank_batch
        out.append([i if i < n else -1 for i in range(start, start + per_rank_batch)])
    return out
