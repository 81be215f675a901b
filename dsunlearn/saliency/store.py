"""The mask on disk: one file per rank, 1 bit per weight of that rank's partition.

`mask_rank<R>.pt` holds the packed bits per parameter with their partition sizes, the mask spec
(mode, tau / top-k share, module filter), the threshold and the world size. A partition only
means something for the world size that cut it, so loading checks it and says so.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from dsunlearn.config import MaskConfig
from dsunlearn.errors import ConfigError
from dsunlearn.fsutil import atomic_path
from kernels.mask_apply import pack_mask, unpack_mask


def mask_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"mask_rank{rank}.pt"


def save_mask(
    folder: Path,
    masks: dict[str, torch.Tensor],
    spec: MaskConfig,
    threshold: float,
    world_size: int,
    rank: int,
) -> Path:
    """Write this rank's mask atomically (the folder must exist)."""
    record = {
        "masks": {n: pack_mask(m.cpu()) for n, m in masks.items()},
        "partition_numel": {n: m.numel() for n, m in masks.items()},
        "spec": asdict(spec),
        "threshold": threshold,
        "world_size": world_size,
        "rank": rank,
    }
    path = mask_file(folder, rank)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return path


def load_mask(folder: Path, rank: int, world_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's masks (bool, partition-sized) and the record's metadata."""
    path = mask_file(folder, rank)
    if not path.is_file():
        raise ConfigError(f"saliency mask not found: {path} (run `dsunlearn saliency` first)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        packed, sizes = record["masks"], record["partition_numel"]
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"not a dsunlearn saliency mask: {path} ({exc})") from exc
    if record["world_size"] != world_size or record["rank"] != rank:
        raise ConfigError(
            f"{path} was cut for world size {record['world_size']}, this run has {world_size}: "
            "rebuild the mask with `dsunlearn saliency` on the same number of ranks"
        )
    masks = {n: unpack_mask(packed[n], sizes[n]) for n in packed}
    meta = {k: record[k] for k in ("spec", "threshold", "world_size")}
    return masks, meta
