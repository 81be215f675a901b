"""The reference models' scores kept between runs (`eval.reference_cache=DIR`).

Every unlearn run scores the vanilla and the gold model before its first method. Those scores
depend only on the two models, the data, the evaluation settings and the world size (batches
are split over ranks), so runs that share all of them — a sweep's trials above all — read them
from `DIR/references-<key>.json` instead of scoring the same models again. The key hashes all of
that, plus a stamp (name, size, mtime) of each model folder's files, so a re-learned model is
scored afresh. Rank 0 writes the file atomically; every rank reads it (a shared filesystem).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsunlearn.config import UnlearnConfig, config_hash, to_dict
from dsunlearn.fsutil import write_json_atomic
from dsunlearn.recipes.run_state import References


def _stamp(model: str | None) -> Any:
    """What identifies a model folder's content cheaply; a hub id or tiny name stands alone."""
    if model is None:
        return None
    p = Path(model)
    if not p.is_dir():
        return model
    files = sorted(f for f in p.iterdir() if f.is_file())
    return [str(p.resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def cache_path(
    cfg: UnlearnConfig, vanilla: str, gold: str | None, world_size: int, splits: list[str]
) -> Path:
    ev = {k: v for k, v in to_dict(cfg.eval).items() if k not in ("every", "reference_cache")}
    key = config_hash(
        {
            "vanilla": _stamp(vanilla),
            "gold": _stamp(gold),
            "data": to_dict(cfg.data),
            "model": to_dict(cfg.model),
            "eval": ev,
            "seed": cfg.seed,  # the protocol's distractor order and sampling
            "siu_image_index": cfg.method.siu_image_index,
            "world_size": world_size,
            "splits": splits,
        }
    )
    return Path(cfg.eval.reference_cache) / f"references-{key}.json"


def load(path: Path) -> References | None:
    if not path.is_file():
        return None
    return References.from_dict(json.loads(path.read_text())["references"])


def save(path: Path, refs: References, is_main: bool) -> None:
    if is_main:
        write_json_atomic(path, {"references": refs.to_dict()})
