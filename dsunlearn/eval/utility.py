"""General-ability scores for a run's report: POPE and MMBench beside the forget/retain metrics.

Unlearning a face must not cost the model its ordinary abilities. `eval.utility=[pope,mmbench]`
names the benchmarks; `eval.utility_paths` gives their data (a POPE folder, an MMBench TSV or a
folder holding one), and a benchmark without a path gets its built-in fixture
(`data/utility_fixtures.py`), written once under `data.root` by the main rank.

    sets = build_utility(cfg.eval, cfg.data, cfg.seed)        # None: no utility benchmark
    if sets is not None:                                        # every rank, together:
        metrics.update(score_utility(sets, model, processor, info, zero3))
    report["utility"] = utility_facts(sets)                     # data, counts, notes

`score_utility` gives flat metric names (`pope_accuracy`, `pope_precision`, `pope_recall`,
`pope_f1`, `pope_yes_ratio`, `mmbench_accuracy`, `mmbench_unparsed_rate` and, with
`eval.mmbench_circular=true`, `mmbench_circular_accuracy`); `detail=True` adds the per-file
and per-category numbers that `dsunlearn eval --benchmark pope|mmbench` reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsunlearn.config import DataConfig, EvalConfig
from dsunlearn.engine.dist import DistInfo, barrier
from dsunlearn.eval.benchmarks.base import Protocol, build_protocol
from dsunlearn.eval.benchmarks.general import TINY_MODEL_NOTE, generate
from dsunlearn.eval.benchmarks.mmbench import mmbench_scores
from dsunlearn.eval.benchmarks.pope import pope_scores

MMBENCH_FIXTURE_TSV = "mmbench_dev_en.tsv"
SCORERS: dict[str, Callable[[Any, Sequence[str], bool], dict[str, float]]] = {
    "pope": pope_scores,
    "mmbench": mmbench_scores,
}


@dataclass
class UtilitySets:
    """Each named benchmark's protocol and built test sets, and where its data came from."""

    protocols: dict[str, Protocol]
    sets: dict[str, Any]
    paths: dict[str, str]
    builtin: dict[str, bool] = field(default_factory=dict)  # the built-in fixture was used

    @property
    def names(self) -> list[str]:
        return list(self.sets)


def utility_names(cfg: EvalConfig) -> list[str]:
    """`cfg.utility` without repeats; an unknown name is a one-line ConfigError (checked again
    here: the lists may have changed since the config was read)."""
    cfg.check_utility()
    return list(dict.fromkeys(cfg.utility))


def fixture_path(name: str, data: DataConfig) -> Path:
    """Where the built-in fixture of benchmark `name` is kept: under `data.root`, keyed by the
    built-in world's seed (`data.seed`)."""
    folder = Path(data.root) / f"utility-{name}-seed{data.seed}"
    return folder / MMBENCH_FIXTURE_TSV if name == "mmbench" else folder


def _ensure_fixture(name: str, data: DataConfig) -> Path:
    from dsunlearn.data.utility_fixtures import ensure_mmbench_fixture, ensure_pope_fixture

    path = fixture_path(name, data)
    if name == "pope":
        return ensure_pope_fixture(path, seed=data.seed)
    return ensure_mmbench_fixture(path, seed=data.seed)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def build_utility(cfg: EvalConfig, data: DataConfig, seed: int) -> UtilitySets | None:
    """The test sets of every benchmark in `cfg.utility` (None when it is empty), on the data of
    `cfg.utility_paths` or the built-in fixtures (written by the main rank; every rank that has
    joined a process group must call this together). Missing or malformed data is a one-line
    DataError; `seed` picks the questions `cfg.max_items` keeps."""
    names = utility_names(cfg)
    if not names:
        return None
    missing = [n for n in names if not cfg.utility_paths.get(n)]
    if missing:
        if _is_main():
            for n in missing:
                _ensure_fixture(n, data)
        barrier()
    out = UtilitySets({}, {}, {})
    for n in names:
        path = cfg.utility_paths.get(n) or str(fixture_path(n, data))
        protocol = build_protocol(n, data, dataclasses.replace(cfg, path=path), seed)
        out.protocols[n] = protocol
        out.sets[n] = protocol.build("test")
        out.paths[n] = path
        out.builtin[n] = n in missing
    return out


def score_utility(
    sets: UtilitySets,
    model: Any,
    processor: Any,
    info: DistInfo,
    zero3: bool,
    detail: bool = False,
) -> dict[str, float]:
    """Flat metrics of every utility benchmark (module docstring); greedy generation sharded
    over the ranks, so every rank must call this together, on ZeRO-3 weights too."""
    out: dict[str, float] = {}
    for n in sets.names:
        protocol = sets.protocols[n]
        answers = generate(model, processor, sets.sets[n].items, protocol.cfg, info, zero3)
        out.update(SCORERS[n](sets.sets[n], answers, detail))
    return out


def utility_facts(sets: UtilitySets | None) -> dict[str, Any]:
    """What a report says about the utility benchmarks: per benchmark its data (and whether it
    is the built-in fixture), question counts and notes; plus `utility_note()`."""
    if sets is None:
        return {}
    out: dict[str, Any] = {"note": utility_note()}
    for n in sets.names:
        facts = sets.protocols[n].facts(sets.sets[n], with_original=False)
        facts["notes"] = [x for x in facts.get("notes", []) if x != TINY_MODEL_NOTE]
        out[n] = {"data": sets.paths[n], "builtin_fixture": sets.builtin[n], **facts}
    return out


def utility_note() -> str:
    """The sentence a report puts beside POPE/MMBench numbers of the built-in tiny models."""
    return f"POPE / MMBench: {TINY_MODEL_NOTE}."
