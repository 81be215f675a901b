"""Deterministic global batches, split over ranks.

Every rank walks the same seeded permutation and takes its own contiguous slice of each
global batch. With the same seed and global batch, 1 rank and N ranks see exactly the same
examples per optimizer step, which is what makes their loss curves comparable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
