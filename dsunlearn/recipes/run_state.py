"""What an unlearn run has finished, so that a relaunch with `resume=auto` skips it.

`<run>/progress.json` (rank 0, atomic) holds the vanilla model's metrics and probe answers and,
per finished method, its metrics, loss curve and report info. The method in progress lives in
its checkpoints (engine/checkpoint.py). The file is removed once the report is written.

A run folder belongs to one set of settings: its fingerprint is the config hash without the
keys that only say how the run is driven (checkpointing, resume, timeouts, logging), and a
relaunch with other settings is refused instead of mixing two experiments in one report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsunlearn.config import UnlearnConfig, config_hash, to_dict
from dsunlearn.engine import checkpoint
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError
from dsunlearn.fsutil import write_json_atomic

DRIVING_KEYS = ("checkpoint", "resume", "dist_timeout_s", "log_every")


def fingerprint(cfg: UnlearnConfig, vanilla: str) -> str:
    settings = {k: v for k, v in to_dict(cfg).items() if k not in DRIVING_KEYS}
    return config_hash({"settings": settings, "vanilla": vanilla})


def check_same_run(meta: dict[str, Any], expected: str, where: Path) -> None:
    if meta.get("fingerprint") != expected:
        raise ConfigError(
            f"{where} was written by a run with other settings (model, data, methods, "
            "optimizer ...): relaunch it with its own config, or pick another name="
        )


class RunProgress:
    def __init__(self, run_dir: Path, fp: str, is_main: bool) -> None:
        self.path = run_dir / "progress.json"
        self.fingerprint = fp
        self.is_main = is_main
        self.vanilla: dict[str, Any] | None = None
        self.methods: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, run_dir: Path, fp: str, resume: str, info: DistInfo) -> RunProgress:
        """Read what finished (resume=auto) or check that a fresh run overwrites nothing.
        Every refusal comes here, before any engine is built."""
        if resume not in ("", "auto"):
            raise ConfigError(f"resume must be '' or 'auto', not '{resume}'")
        progress = cls(run_dir, fp, info.is_main)
        ckpts = run_dir / "checkpoints"
        if resume == "":
            if progress.path.is_file() or any(ckpts.glob("*/latest")):
                raise ConfigError(
                    f"{run_dir} holds an earlier run's checkpoints or progress: resume=auto "
                    "continues it; pick another name= (or remove the folder) to start over"
                )
            return progress
        for save_dir in sorted(p.parent for p in ckpts.glob("*/latest")):
            tag = checkpoint.latest_tag(save_dir)
            meta = checkpoint.read_meta(save_dir / tag)
            check_same_run(meta, fp, save_dir / tag)
            checkpoint.check_world_size(meta, info.world_size, save_dir / tag)
        if progress.path.is_file():
            record = json.loads(progress.path.read_text())
            check_same_run(record, fp, progress.path)
            progress.vanilla = record.get("vanilla")
            progress.methods = record.get("methods", {})
        return progress

    def finish_vanilla(self, metrics: dict[str, float], answers: list[str] | None) -> None:
        self.vanilla = {"metrics": metrics, "probe_answers": answers}
        self._write()

    def finish_method(
        self,
        name: str,
        metrics: dict[str, float],
        curve: list[dict[str, float]],
        info: dict[str, Any],
        resumed: dict[str, int] | None,
    ) -> None:
        self.methods[name] = {"metrics": metrics, "losses": curve, "info": info}
        if resumed:
            self.methods[name]["resumed"] = resumed
        self._write()

    def _write(self) -> None:
        if self.is_main:
            record = {"fingerprint": self.fingerprint, "vanilla": self.vanilla}
            write_json_atomic(self.path, {**record, "methods": self.methods})

    def remove(self) -> None:
        if self.is_main:
            self.path.unlink(missing_ok=True)
