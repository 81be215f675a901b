"""Checkpoints that a run can continue from bit for bit, and that only count once complete.

Layout, one DeepSpeed save folder per method:

    <run>/checkpoints/<method>/latest                the tag of the newest COMPLETE checkpoint
    <run>/checkpoints/<method>/zero_to_fp32.py       DeepSpeed's consolidation script
    <run>/checkpoints/<method>/step<N>[-selected<S>]/ DeepSpeed's ZeRO-3 files (each rank its
                                                     partition of weights and optimizer state,
                                                     the LR scheduler, our client state)
        resume_rank<R>.pt                            rank R's RNG states and data position
        mask_rank<R>.pt                              the method's own state (MMUnlearner's mask)
        dsunlearn.json                               method, step, world size, the run's config

A method's final checkpoint (`checkpoint.final`) holds the weights of the step in-run selection
chose (`selected_step` in dsunlearn.json); when that is not its last step, its tag says so:
`step<N>-selected<S>`.

Every rank writes its files, all ranks meet at a barrier, rank 0 writes `dsunlearn.json` and
only then replaces `latest` by rename. A crash anywhere before that rename leaves `latest` on the
previous checkpoint, which stays valid: older tags are pruned only after the new `latest` is in
place. DeepSpeed's own `latest` writing is switched off (`save_latest=False`): it is not atomic.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsunlearn.engine.dist import DistInfo, barrier
from dsunlearn.errors import ConfigError, ModelError
from dsunlearn.fsutil import write_json_atomic, write_text_atomic

META = "dsunlearn.json"
_TAG = re.compile(r"^step(\d+)(-selected\d+)?$")


def tag_for(step: int) -> str:
    return f"step{step}"


def rng_state() -> dict[str, Any]:
    """Every generator a step may draw from on this rank."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resume:
    """What a run continues from: the checkpoint folder and what it recorded."""

    save_dir: Path
    tag: str
    meta: dict[str, Any]
    rank_state: dict[str, Any]  # this rank's resume_rank<R>.pt

    @property
    def path(self) -> Path:
        return self.save_dir / self.tag

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def latest_tag(save_dir: Path) -> str | None:
    """The tag `latest` names, if it names a folder that holds our completion record."""
    pointer = save_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (save_dir / tag / META).is_file():
        raise ModelError(
            f"{pointer} names '{tag}', which has no {META}: not a dsunlearn checkpoint"
        )
    return tag


def read_meta(ckpt: Path) -> dict[str, Any]:
    """`dsunlearn.json` of a checkpoint tag folder."""
    path = ckpt / META
    if not path.is_file():
        raise ModelError(f"{ckpt} is not a complete dsunlearn checkpoint (no {META})")
    return json.loads(path.read_text())


def resolve(path: Path) -> tuple[Path, str]:
    """(save folder, tag) of either a save folder with `latest` or one of its tag folders."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    if (path / META).is_file():
        return path.parent, path.name
    tag = latest_tag(path)
    if tag is None:
        raise ModelError(f"{path} holds no complete checkpoint (no 'latest' file)")
    return path, tag


def check_world_size(meta: dict[str, Any], world_size: int, where: Path) -> None:
    """A checkpoint continues only on the world size that cut it (decided: no resharding)."""
    if meta["world_size"] != world_size:
        raise ConfigError(
            f"{where} was written by {meta['world_size']} ranks and this run has "
            f"{world_size}: resume with {meta['world_size']} ranks (its ZeRO-3 partitions, "
            "optimizer state and saliency mask are cut per rank), or export it with "
            "`dsunlearn export` and start a new run from that model"
        )


def find_resume(save_dir: Path, info: DistInfo) -> Resume | None:
    """The latest complete checkpoint of `save_dir`, checked against this run's world size."""
    tag = latest_tag(save_dir)
    if tag is None:
        return None
    meta = read_meta(save_dir / tag)
    check_world_size(meta, info.world_size, save_dir / tag)
    state = torch.load(
        save_dir / tag / f"resume_rank{info.rank}.pt", map_location="cpu", weights_only=False
    )
    return Resume(save_dir, tag, meta, state)


def save(
    engine: Any,
    save_dir: Path,
    step: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    info: DistInfo,
    method: Any | None = None,
    keep: int = 0,
    tag: str | None = None,
) -> Path:
    """One complete checkpoint at `step`, published last through `latest`; returns its folder.

    `rank_state` is this rank's own (RNG, data position); `meta` is rank 0's record (written
    once all ranks are done); `method.save(folder, rank)` adds the method's state. `keep` > 0
    prunes all but the newest `keep` complete checkpoints. `tag` defaults to `step<N>`.
    """
    tag = tag or tag_for(step)
    folder = save_dir / tag
    if save_dir.is_dir() and latest_tag(save_dir) == tag:
        return folder  # already complete (a resumed run that stops where it started)
    if info.is_main and folder.exists():  # a save that died before `latest` named it
        shutil.rmtree(folder)
    barrier()
    engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    torch.save(rank_state, folder / f"resume_rank{info.rank}.pt")
    if method is not None:
        method.save(folder, info.rank)
    barrier()
    if info.is_main:
        write_json_atomic(folder / META, {**meta, "step": step, "world_size": info.world_size})
        write_text_atomic(save_dir / "latest", tag)
        if keep > 0:
            prune(save_dir, keep)
    barrier()
    return folder


def prune(save_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and dead partial saves."""
    steps = sorted(
        (int(m.group(1)), p) for p in save_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name))
    )
    complete = [p for _, p in steps if (p / META).is_file()]
    current = latest_tag(save_dir)
    for _, p in steps:
        if p not in complete[-keep:] and p.name != current:
            shutil.rmtree(p, ignore_errors=True)
