"""Forget requests that arrive one after another: `unlearn requests=[[P012],[P015],[P003,P007]]`.

Each request is one unlearning step per method, from that method's selected weights after the
previous request (the first from the vanilla model). What each step sees:

- training: forget = the request's people; retain = the data's retain people not forgotten so
  far. People of earlier requests are neither trained on again nor kept: whether they stay
  forgotten is what the evaluation asks.
- evaluation: forget = everyone forgotten so far; retain = the data's retain people that no
  request names, the same people after every request, so the curves compare.
- the frozen reference (KL, NPO, UNDIAL, RMU) stays the vanilla model: its answers on the
  people still kept are the ones to keep, and drift does not add up from request to request.
- gold: the run's gold model never saw the data's forget split. While everyone forgotten so far
  is in that split, its scores on the same sets stand for the per-request gold model's; the
  difference is that it never saw the later requests' people either (`exact`). Once a request
  names a person it saw, its scores with its own unseen people as the forget set stand in
  (`approximate`: the built-in people are generated alike, so one unseen person is as unknown as
  another; a real benchmark's people are not interchangeable). Exact per-request gold models
  cost one `dsunlearn learn gold=true` run each (12 min on 2 CPU cores for the built-in model)
  on data whose forget split is the people forgotten so far.
- the weights handed on: each rank's own partition of the selected weights (engine/snapshot.py)
  and the method's own state (MMUnlearner's mask) under `<run>/requests/r<k>/<method>/`; no rank
  gathers the model. A relaunch with `resume=auto` starts an unfinished request from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsunlearn.config import UnlearnConfig
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.engine.dist import DistInfo, all_reduce_sum, barrier
from dsunlearn.engine.snapshot import Snapshot
from dsunlearn.errors import ConfigError, DataError, ModelError
from dsunlearn.fsutil import write_json_atomic

DONE = "handoff.json"  # rank 0 writes it once every rank's files are in place


@dataclass(frozen=True)
class Request:
    """One forget request: its 1-based index, its people and everyone forgotten so far."""

    index: int
    people: tuple[str, ...]
    forgotten: tuple[str, ...]  # this request's people and every earlier request's
    requested: tuple[str, ...]  # every person any request of the run names
    sequential: bool  # False: the run's one implicit request (the data's forget split)

    @property
    def tag(self) -> str:
        return f"r{self.index}"

    @property
    def is_last(self) -> bool:
        return len(self.forgotten) == len(self.requested)

    def label(self, method: str) -> str:
        """How logs, tracking and curves name this request's run of `method`."""
        return f"{method}@{self.tag}" if self.sequential else method

    def key(self, method: str) -> str:
        """The method's entry in progress.json."""
        return f"{self.tag}/{method}" if self.sequential else method


def check_request_settings(cfg: UnlearnConfig) -> None:
    """What `requests` cannot go with, refused with one line before anything is loaded."""
    if not cfg.requests:
        return
    if cfg.eval.path:
        raise ConfigError("requests evaluate the run's own data: leave eval.path unset")
    if cfg.audit.enabled:
        raise ConfigError(
            "audit=true audits one request's result: run `dsunlearn audit` on the exported "
            "model after the last request instead"
        )
    if cfg.method.mmu_mask_dir and "mmunlearner" in cfg.methods:
        raise ConfigError(
            "method.mmu_mask_dir is a mask of the vanilla weights; with requests MMUnlearner "
            "computes its mask per request: leave it unset"
        )
    for i, people in enumerate(cfg.requests, 1):
        if not people:
            raise ConfigError(f"requests: request {i} names nobody")


def plan_requests(cfg: UnlearnConfig, bench: Benchmark) -> list[Request]:
    """The run's requests; one line for an unknown or repeated person."""
    if not cfg.requests:
        ids = tuple(r.id for r in bench.forget)
        return [Request(1, ids, ids, ids, sequential=False)]
    check_request_settings(cfg)
    known = {r.id for r in (*bench.forget, *bench.retain)}
    seen: list[str] = []
    for i, people in enumerate(cfg.requests, 1):
        for person in people:
            if person not in known:
                raise DataError(
                    f"requests: request {i} names '{person}', who is not in "
                    f"{bench.source} (people: {', '.join(sorted(known)[:8])}, ...)"
                )
            if person in seen:
                raise ConfigError(f"requests: '{person}' is named twice (request {i})")
            seen.append(person)
    if not [r for r in bench.retain if r.id not in seen]:
        raise ConfigError("requests: they name every retain person; nobody is left to keep")
    out, so_far = [], ()
    for i, people in enumerate(cfg.requests, 1):
        so_far = (*so_far, *people)
        out.append(Request(i, tuple(people), so_far, tuple(seen), sequential=True))
    return out


def _regroup(bench: Benchmark, forget: set[str], retain: set[str]) -> Benchmark:
    """`bench` with these forget and retain people (held-out pictures of nobody else)."""
    people = [*bench.forget, *bench.retain]
    keep = forget | retain
    return dataclasses.replace(
        bench,
        forget=[r for r in people if r.id in forget],
        retain=[r for r in people if r.id in retain],
        test=[r for r in bench.test if r.id in keep],
    )


def train_view(bench: Benchmark, req: Request) -> Benchmark:
    """What the request's methods train on (and MMUnlearner and MANU score)."""
    if not req.sequential:
        return bench
    retain = {r.id for r in bench.retain} - set(req.forgotten)
    return _regroup(bench, set(req.people), retain)


def eval_view(bench: Benchmark, req: Request) -> Benchmark:
    """What the request's results are scored on."""
    if not req.sequential:
        return bench
    return _regroup(bench, set(req.forgotten), _kept(bench, req))


def gold_view(bench: Benchmark, req: Request) -> tuple[Benchmark | None, bool]:
    """The sets the gold model is scored on, and whether its row is exact: None (the same
    sets as everyone's) while it never saw anyone forgotten so far, else its own unseen people
    as the forget set (an approximation, see the module docstring)."""
    unseen = set(bench.forget_ids)
    if not req.sequential or set(req.forgotten) <= unseen:
        return None, True
    return _regroup(bench, unseen, _kept(bench, req)), False


def _kept(bench: Benchmark, req: Request) -> set[str]:
    return {r.id for r in bench.retain} - set(req.requested)


def handoff_dir(run_dir: Path, req: Request, method: str) -> Path:
    return run_dir / "requests" / req.tag / method


def save_handoff(
    engine: Any, method: Any, folder: Path, step: int, info: DistInfo, meta: dict[str, Any]
) -> None:
    """Each rank's partition of the engine's trainable weights (the selected ones, already
    restored) and the method's own state; `DONE` last, once every rank has written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"weights_rank{info.rank}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(Snapshot.capture(engine, step).state(), tmp)
    os.replace(tmp, path)
    method.save(folder, info.rank)
    barrier()
    if info.is_main:
        write_json_atomic(folder / DONE, {**meta, "world_size": info.world_size, "step": step})
    barrier()


def load_handoff(engine: Any, folder: Path, info: DistInfo) -> None:
    """Put the previous request's selected weights into a freshly built engine."""
    if not (folder / DONE).is_file():
        raise ModelError(f"{folder}: the previous request's weights are incomplete ({DONE})")
    meta = json.loads((folder / DONE).read_text())
    if meta["world_size"] != info.world_size:
        raise ConfigError(
            f"{folder} was written by {meta['world_size']} ranks, this run has {info.world_size}"
        )
    state = torch.load(folder / f"weights_rank{info.rank}.pt", weights_only=True)
    Snapshot.from_state(state).restore(engine)


def drop_weights(folder: Path, info: DistInfo) -> None:
    """Free the disk a handed-on request's weights take once the next request has finished
    (the method's own state, e.g. the mask, stays for the report)."""
    (folder / f"weights_rank{info.rank}.pt").unlink(missing_ok=True)


def mask_overlap(
    masks: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], device: torch.device
) -> dict[str, float]:
    """How much of the previous request's mask the new one keeps, over all ranks: Jaccard
    |A ∩ B| / |A ∪ B|, and the share of the previous mask kept |A ∩ B| / |A|."""
    inter = union = before = 0
    for name, m in masks.items():
        p = previous.get(name)
        if p is None:
            continue
        m, p = m.cpu(), p.cpu()
        inter += int((m & p).sum())
        union += int((m | p).sum())
        before += int(p.sum())
    counts = all_reduce_sum(
        torch.tensor([inter, union, before], dtype=torch.float64, device=device)
    )
    inter, union, before = counts.tolist()
    return {
        "jaccard": inter / union if union else 0.0,
        "kept_share": inter / before if before else 0.0,
        "selected_before": int(before),
    }
