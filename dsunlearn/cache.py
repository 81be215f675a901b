"""Where learned vanilla models live, and the key that names them.

A vanilla model is keyed by the data seed and size and by a hash of everything that shapes
its weights (model, optimiser, schedule, stopping rule), so a changed setting never reuses a
stale model. The repo ships one under `checkpoints/vanilla/` for the demo's default.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dsunlearn.config import LearnConfig, config_hash, to_dict
from dsunlearn.data.builtin import GENERATOR_VERSION
from dsunlearn.data.vocab import tiny_vocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]
META_FILE = "learn_meta.json"


def cache_root(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("DSUNLEARN_CACHE"):
        return Path(os.environ["DSUNLEARN_CACHE"])
    if (REPO_ROOT / "setup.py").is_file():  # a source checkout (editable install)
        return REPO_ROOT / "checkpoints"
    return Path.home() / ".cache" / "dsunlearn"


def vanilla_key(cfg: LearnConfig) -> str:
    d = to_dict(cfg)
    shaping = {
        "model": d["model"],
        "optim": d["optim"],
        "data": {k: d["data"][k] for k in ("path", "seed", "entities", "forget_pct")},
        "target_acc": d["target_acc"],
        "eval_every": d["eval_every"],
        "augment": d["augment"],
        "seed": d["seed"],
        # The built-in world: its generator and the tiny tokenizers' vocabulary.
        "builtin_generator": GENERATOR_VERSION,
        "tiny_vocabulary": hashlib.sha256("\n".join(tiny_vocabulary()).encode()).hexdigest()[:16],
    }
    return f"{cfg.model.name.replace('/', '--')}-seed{cfg.data.seed}-e{cfg.data.entities}-{config_hash(shaping)}"


def vanilla_dir(cfg: LearnConfig) -> Path:
    return cache_root(cfg.cache_dir) / "vanilla" / vanilla_key(cfg)


def is_complete(path: Path) -> bool:
    """A cache entry counts only once its metadata file (written last) is there."""
    return (path / META_FILE).is_file()
