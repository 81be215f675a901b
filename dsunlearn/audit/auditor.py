"""The audit as a component: the attacks on one or more audited models against one gold and one
vanilla model, whose results are computed once (and kept in `audit.reference_cache`).

`dsunlearn audit` (recipes/audit.py) audits a model folder; `unlearn audit=true` audits each
method's selected weights where they are, on the ranks (`audit/weights.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsunlearn.audit.context import AuditContext, Source
from dsunlearn.audit.membership import membership_suite
from dsunlearn.audit.probe import identity_probe
from dsunlearn.audit.quantize import quantization
from dsunlearn.audit.relearn import relearn
from dsunlearn.audit.rephrase import rephrased_images
from dsunlearn.audit.report import audit_markdown, plot_audit
from dsunlearn.audit.sets import build_audit_sets
from dsunlearn.audit.verdict import JUDGES
from dsunlearn.config import (
    AuditConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    config_hash,
    to_dict,
)
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.engine.dist import DistInfo, any_rank, get_logger
from dsunlearn.fsutil import atomic_path, write_json_atomic, write_text_atomic
from dsunlearn.recipes.common import deepspeed_config, is_zero3, model_dtype

RUNS: dict[str, Callable[[AuditContext, Source], dict[str, Any]]] = {
    "relearn": relearn,
    "quant": quantization,
    "probe": identity_probe,
    "rephrase": rephrased_images,
    "mia": membership_suite,
}
CACHE_FREE = ("attacks", "margin", "reference_cache", "enabled")  # no result depends on these


class ReferenceCache:
    """The gold and vanilla models' results of each attack, kept in `cfg.reference_cache`
    under a key of everything they depend on (the model files included); the audited model is
    always run. Every rank takes the same branch."""

    def __init__(
        self,
        cfg: AuditConfig,
        data: DataConfig,
        benchmark: str,
        eval_cfg: EvalConfig,
        dtype: str,
        seed: int,
        world_size: int,
    ) -> None:
        self.dir = Path(cfg.reference_cache) if cfg.reference_cache else None
        self.memory: dict[tuple[str, str], dict[str, Any]] = {}  # within this process
        settings = {k: v for k, v in to_dict(cfg).items() if k not in CACHE_FREE}
        self.base = {
            "data": str(Path(data.resolved_path()).resolve()),
            "forget_pct": data.forget_pct,
            "benchmark": benchmark,
            "settings": settings,
            "eval": to_dict(eval_cfg),
            "dtype": dtype,
            "seed": seed,
            "world_size": world_size,  # relearning's float sums follow the sharding
        }

    def path(self, attack: str, model: str) -> Path | None:
        """The cache file of `attack` on the model folder `model` (None without a folder)."""
        if self.dir is None:
            return None
        folder = Path(model)
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        key = config_hash(
            {**self.base, "attack": attack, "model": str(folder.resolve()), "files": stamp}
        )
        return self.dir / f"{attack}-{folder.name}-{key}.json"

    def run(self, attack: str, role: str, source: Source, ctx: AuditContext) -> dict[str, Any]:
        """`attack` on `source`; the gold and vanilla results come from memory or the folder
        when they are there (the audited model is always run)."""
        if role == "model" or not isinstance(source, str):
            return RUNS[attack](ctx, source)
        mem = (attack, source)
        if mem in self.memory:
            return self.memory[mem]
        path = self.path(attack, source)
        if path is not None and not any_rank(not path.is_file(), ctx.info.device):
            result = json.loads(path.read_text())
        else:
            result = RUNS[attack](ctx, source)
            if path is not None and ctx.info.is_main:
                write_json_atomic(path, result)
        self.memory[mem] = result
        return result


class Auditor:
    """Audits models on `bench` (the benchmark, not yet split) against `gold` and `vanilla`.
    Every rank builds it and calls `audit` together."""

    def __init__(
        self,
        cfg: AuditConfig,
        bench: Benchmark,
        data: DataConfig,
        benchmark: str,
        gold: str,
        vanilla: str,
        info: DistInfo,
        eval_cfg: EvalConfig,
        ds_path: str,
        dtype: str = "fp32",
        seed: int = 0,
    ) -> None:
        self.cfg, self.gold, self.vanilla, self.info = cfg, gold, vanilla, info
        model_cfg = ModelConfig(name=vanilla, dtype=dtype)
        infer = OptimConfig(batch_size=info.world_size)  # inference: one row per rank per step
        relearn_optim = OptimConfig(batch_size=cfg.relearn_batch_size)
        ds = deepspeed_config(ds_path, infer, model_cfg, info)
        self.ctx = AuditContext(
            info=info,
            ds=ds,
            train_ds=deepspeed_config(ds_path, relearn_optim, model_cfg, info),
            zero3=is_zero3(ds),
            dtype=model_dtype(model_cfg),
            cfg=cfg,
            eval_cfg=eval_cfg,
            sets=build_audit_sets(bench.split("test"), eval_cfg, cfg.retain_max_items, seed),
            seed=seed,
            appearance=dict(bench.appearance),
        )
        self.cache = ReferenceCache(cfg, data, benchmark, eval_cfg, dtype, seed, info.world_size)
        self.facts = {"name": benchmark, "data": data.resolved_path(), "split": "test"}

    def audit(self, source: Source) -> dict[str, Any]:
        """Every attack of `cfg.attacks` on `source`, gold and vanilla, with its verdict."""
        log = get_logger()
        models = {"model": source, "gold": self.gold, "vanilla": self.vanilla}
        t0 = time.time()
        attacks: dict[str, Any] = {}
        for name in self.cfg.attacks:
            t = time.time()
            res = {role: self.cache.run(name, role, m, self.ctx) for role, m in models.items()}
            res["verdict"] = JUDGES[name](res, self.cfg.margin)
            res["elapsed_s"] = round(time.time() - t, 1)
            attacks[name] = res
            log.info(f"audit {name}: {res['verdict']['status']} ({res['verdict']['why']})")
        return {
            "models": {role: str(m) for role, m in models.items()},
            "benchmark": self.facts,
            "world_size": self.info.world_size,
            "settings": to_dict(self.cfg),
            "attacks": attacks,
            "elapsed_s": round(time.time() - t0, 1),
        }


def write_audit(audit: dict[str, Any], out_dir: str | Path) -> Path:
    """audit.png, audit.md, then audit.json (last: its presence means all three); rank 0."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "audit.png") as tmp:
        plot_audit(audit, tmp)
    write_text_atomic(out / "audit.md", audit_markdown(audit))
    write_json_atomic(out / "audit.json", audit)
    return out / "audit.json"
