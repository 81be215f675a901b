"""Where learned vanilla and gold models live, and the key that names them.

A learned model is keyed by the data seed and size and by a hash of everything that shapes
its weights (model, optimiser, schedule, stopping rule), so a changed setting never reuses a
stale model. The gold model (`learn gold=true`: the same training without any forget person's
image) gets the same key plus the gold flag, under `gold/` instead of `vanilla/`. The repo ships
both under `checkpoints/` for the data seeds the demo and `benchmarks/quality.py` use.
"""

from __future__ import annotations

import dataclasses
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
    """The cache key of `cfg`'s model (its gold twin's when `cfg.gold`)."""
    d = to_dict(cfg)
    shaping = {
        # What the learn run's weights depend on: not how a later run computes (checkpointing).
        "model": {"name": cfg.model.name, "dtype": cfg.model.dtype},
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
    if cfg.gold:  # only then: the vanilla keys shipped before the gold model existed stay valid
        shaping["gold"] = True
    return f"{cfg.model.name.replace('/', '--')}-seed{cfg.data.seed}-e{cfg.data.entities}-{config_hash(shaping)}"


def vanilla_dir(cfg: LearnConfig) -> Path:
    """The cache folder of `cfg`'s model: `vanilla/<key>`, or `gold/<key>` when `cfg.gold`."""
    return cache_root(cfg.cache_dir) / ("gold" if cfg.gold else "vanilla") / vanilla_key(cfg)


def gold_dir(cfg: LearnConfig) -> Path:
    """The gold twin of the vanilla model that `cfg` learns."""
    return vanilla_dir(dataclasses.replace(cfg, gold=True))


DTYPES = ("fp32", "bf16")


def find_learned(cfg: LearnConfig) -> Path:
    """The learned model (gold twin when `cfg.gold`) a run with `cfg`'s data, model and seed
    uses, whatever dtype the run trains in: the one learned in `cfg`'s dtype if there is one,
    else one learned in another dtype (loaded in the run's). Where none is complete, the path
    `dsunlearn learn` would write, for the error message."""
    own = vanilla_dir(cfg)
    if is_complete(own):
        return own
    for dtype in DTYPES:
        other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
        if is_complete(vanilla_dir(other)):
            return vanilla_dir(other)
    return own


def is_complete(path: Path) -> bool:
    """A cache entry counts only once its metadata file (written last) is there."""
    return (path / META_FILE).is_file()
