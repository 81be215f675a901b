"""What an unlearn run has finished, so that a relaunch with `resume=auto` skips it.

`<run>/progress.json` (rank 0, atomic) holds one `RunProgress`: the reference models' scores
(vanilla and gold, on the test and validation splits) per request and one `MethodResult` per
finished method and request (`r<k>/<method>` with `requests`, else `<method>`). The method in
progress lives in its checkpoints (engine/checkpoint.py). The file is removed once the report
is written.

A run folder belongs to one set of settings: its fingerprint is the config hash without the
keys that only say how the run is driven (checkpointing, resume, timeouts, logging, tracking),
and a relaunch with other settings is refused instead of mixing two experiments in one report.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsunlearn.config import UnlearnConfig, config_hash, to_dict
from dsunlearn.engine import checkpoint
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError
from dsunlearn.eval.benchmarks import Scored
from dsunlearn.fsutil import write_json_atomic

DRIVING_KEYS = ("checkpoint", "resume", "dist_timeout_s", "log_every", "report_to")


@dataclass
class MethodResult:
    """Everything the report says about one method's run."""

    name: str
    metrics: dict[str, float]  # test split, at the selected step
    losses: list[dict[str, float]]  # per iteration
    curve: list[dict[str, float]] = field(default_factory=list)  # validation, per evaluated step
    selection: dict[str, Any] = field(default_factory=dict)  # eval/selection.py's summary
    truth_ratios: list[float] = field(default_factory=list)  # test forget items (forget quality)
    info: dict[str, Any] = field(default_factory=dict)  # method.report_info()
    timing: dict[str, float] = field(default_factory=dict)  # seconds: train, in-run eval, test
    resumed: dict[str, int] | None = None
    audit: dict[str, Any] | None = None  # `audit=true`: each attack's verdict (audit/summary)

    def scored(self) -> Scored:
        return Scored(self.metrics, self.truth_ratios)


@dataclass
class References:
    """The reference rows, scored once per run: the vanilla model (also the original of flu and
    the other comparisons) and the gold model, on the test split and the validation split."""

    vanilla: Scored | None = None
    vanilla_val: Scored | None = None
    gold: Scored | None = None
    gold_val: Scored | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: None if v is None else v.to_dict() for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> References:
        return cls(**{k: None if v is None else Scored.from_dict(v) for k, v in d.items()})


def fingerprint(cfg: UnlearnConfig, vanilla: str) -> str:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in DRIVING_KEYS}
    return config_hash({"settings": settings, "vanilla": vanilla})


def check_same_run(meta: dict[str, Any], expected: str, where: Path) -> None:
    if meta.get("fingerprint") != expected:
        raise ConfigError(
            f"{where} was written by a run with other settings (model, data, methods, "
            "optimizer ...): relaunch it with its own config, or pick another name="
        )


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every method's checkpoint folder in the run: `checkpoints/<method>/`, and with
    `requests` `checkpoints/r<k>/<method>/`."""
    ckpts = run_dir / "checkpoints"
    found = [*ckpts.glob("*/latest"), *ckpts.glob("r*/*/latest")]
    return sorted({p.parent for p in found if p.is_file()})


class RunProgress:
    def __init__(self, run_dir: Path, fp: str, is_main: bool) -> None:
        self.path = run_dir / "progress.json"
        self.fingerprint = fp
        self.is_main = is_main
        self.references: dict[int, References] = {}  # request index -> its reference rows
        self.methods: dict[str, MethodResult] = {}  # Request.key(method) -> its result

    @classmethod
    def open(cls, run_dir: Path, fp: str, resume: str, info: DistInfo) -> RunProgress:
        """Read what finished (resume=auto) or check that a fresh run overwrites nothing.
        Every refusal comes here, before any engine is built."""
        if resume not in ("", "auto"):
            raise ConfigError(f"resume must be '' or 'auto', not '{resume}'")
        progress = cls(run_dir, fp, info.is_main)
        saves = checkpoint_dirs(run_dir)
        if resume == "":
            if progress.path.is_file() or saves:
                raise ConfigError(
                    f"{run_dir} holds an earlier run's checkpoints or progress: resume=auto "
                    "continues it; pick another name= (or remove the folder) to start over"
                )
            return progress
        for save_dir in saves:
            tag = checkpoint.latest_tag(save_dir)
            meta = checkpoint.read_meta(save_dir / tag)
            check_same_run(meta, fp, save_dir / tag)
            checkpoint.check_world_size(meta, info.world_size, save_dir / tag)
        if progress.path.is_file():
            record = json.loads(progress.path.read_text())
            check_same_run(record, fp, progress.path)
            progress.references = {
                int(k): References.from_dict(r) for k, r in record.get("references", {}).items()
            }
            progress.methods = {
                name: MethodResult(**r) for name, r in record.get("methods", {}).items()
            }
        return progress

    def finish_references(self, refs: References, request: int = 1) -> None:
        self.references[request] = refs
        self._write()

    def finish_method(self, result: MethodResult, key: str) -> None:
        self.methods[key] = result
        self._write()

    def _write(self) -> None:
        if self.is_main:
            write_json_atomic(
                self.path,
                {
                    "fingerprint": self.fingerprint,
                    "references": {str(k): r.to_dict() for k, r in self.references.items()},
                    "methods": {k: dataclasses.asdict(v) for k, v in self.methods.items()},
                },
            )

    def remove(self) -> None:
        if self.is_main:
            self.path.unlink(missing_ok=True)
