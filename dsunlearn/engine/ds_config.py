"""DeepSpeed JSON configs: read the file, fill the "auto" fields from our own config."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dsunlearn.errors import ConfigError


def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        # Fall back to the configs/ folder shipped beside the package (running from elsewhere).
        shipped = Path(__file__).resolve().parents[2] / p
        if not p.is_absolute() and shipped.is_file():
            p = shipped
        else:
            raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config {p} is not valid JSON: {e.msg} at line {e.lineno}"
        ) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {p} must hold a JSON object")
    return cfg


def fill_ds_config(
    cfg: dict[str, Any],
    *,
    global_batch: int,
    world_size: int,
    grad_clip: float,
    bf16: bool | None = None,
) -> dict[str, Any]:
    """Return a copy with the per-rank batch, clipping and precision set.

    The global batch is split evenly over ranks, so that 1 and N ranks see the same data
    per optimizer step; an uneven split is refused rather than silently changed.
    """
    if global_batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {global_batch}")
    if global_batch % world_size:
        raise ConfigError(
            f"batch size {global_batch} does not split evenly over {world_size} ranks"
        )
    out = copy.deepcopy(cfg)
    gas = out.get("gradient_accumulation_steps", 1)
    if gas in ("auto", None):
        gas = 1
    out["gradient_accumulation_steps"] = gas
    micro = global_batch // world_size
    if micro % gas:
        raise ConfigError(f"per-rank batch {micro} does not split into {gas} accumulation steps")
    out["train_micro_batch_size_per_gpu"] = micro // gas
    out["train_batch_size"] = global_batch
    if out.get("gradient_clipping", "auto") == "auto":
        out["gradient_clipping"] = grad_clip
    if bf16 is not None:
        out.setdefault("bf16", {})["enabled"] = bool(bf16)
    for key in ("optimizer", "scheduler"):
        if key in out:  # we always pass our own optimizer and schedule
            raise ConfigError(f"DeepSpeed config must not set '{key}': dsunlearn builds its own")
    return out


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
