"""`dsunlearn audit`: every attack of dsunlearn/audit/ on the audited model, the gold model and
the vanilla model, on any number of ZeRO-3 ranks; writes audit.json, audit.md and audit.png.

Inputs are checked before any model is loaded: an unknown attack, a model folder that is not
there, or three models of different architectures each stop with one line (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsunlearn.config import ATTACKS, REPHRASINGS, AuditConfig, DataConfig, EvalConfig
from dsunlearn.engine.dist import barrier, get_logger, init_distributed
from dsunlearn.errors import ConfigError, ModelError
from dsunlearn.recipes.common import prepare_benchmark

BENCHMARKS = ("builtin", "mllmu")  # MLLMU-Bench-shaped: pictures, image questions, held-out set
# What must agree for the three models to be the same architecture (top level, text, vision).
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "image_size",
    "patch_size",
)


def check_settings(cfg: AuditConfig, benchmark: str, world_size: int | None = None) -> None:
    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack {unknown[0]!r} (known: {', '.join(ATTACKS)})")
    if not cfg.attacks:
        raise ConfigError("audit.attacks is empty: name at least one of " + ", ".join(ATTACKS))
    bad = [r for r in cfg.rephrase if r not in REPHRASINGS]
    if bad:
        raise ConfigError(f"unknown image rephrasing {bad[0]!r} (known: {', '.join(REPHRASINGS)})")
    if benchmark not in BENCHMARKS:
        raise ConfigError(
            f"audit runs on MLLMU-Bench-shaped benchmarks ({', '.join(BENCHMARKS)}), not "
            f"'{benchmark}'"
        )
    if not cfg.relearn_steps or min(cfg.relearn_steps) < 1:
        raise ConfigError(f"audit.relearn_steps must be positive step counts: {cfg.relearn_steps}")
    if any(b not in (2, 3, 4, 5, 6, 7, 8) for b in cfg.quant_bits) or cfg.quant_group < 1:
        raise ConfigError(
            f"audit.quant_bits must be in 2..8 and quant_group >= 1: {cfg.quant_bits}, "
            f"{cfg.quant_group}"
        )
    if world_size and cfg.relearn_batch_size % world_size:
        raise ConfigError(
            f"audit.relearn_batch_size {cfg.relearn_batch_size} must be a multiple of the "
            f"{world_size} ranks"
        )


def architecture(role: str, path: str) -> dict[str, Any]:
    """The fields of `path`'s config that fix its architecture; a missing model is one line."""
    from transformers import AutoConfig

    from dsunlearn.models.loader import resolve_source

    try:
        source, local = resolve_source(path)
        cfg = AutoConfig.from_pretrained(source, local_files_only=local).to_dict()
    except ModelError as e:
        raise ModelError(f"{role} model: {e}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{role} model: cannot read its config at {path}: {e}") from None
    out = {}
    for prefix, part in (
        ("", cfg),
        *((f"{k}.", cfg.get(k) or {}) for k in ("text_config", "vision_config")),
    ):
        out.update({prefix + k: part[k] for k in ARCH_KEYS if k in part})
    return out


def check_models(models: dict[str, str]) -> None:
    """Every model exists and all share the audited model's architecture."""
    archs = {role: architecture(role, path) for role, path in models.items()}
    ref = archs["model"]
    for role, arch in archs.items():
        diff = sorted(k for k in ref.keys() | arch.keys() if ref.get(k) != arch.get(k))
        if diff:
            k = diff[0]
            raise ModelError(
                f"the {role} model's architecture differs from the audited model's: {k} is "
                f"{arch.get(k)} there, {ref.get(k)} in {models['model']}"
            )


def run_audit(
    model_dir: str,
    vanilla_dir: str,
    gold_dir: str,
    data: DataConfig,
    cfg: AuditConfig,
    out_dir: str,
    eval_cfg: EvalConfig | None = None,
    benchmark: str = "builtin",
    ds_path: str = "configs/deepspeed/zero3_cpu.json",
    dtype: str = "fp32",
    seed: int = 0,
) -> Path:
    """Every attack of `cfg.attacks` on the three models; returns audit.json's path."""
    from dsunlearn.audit.auditor import Auditor, write_audit

    eval_cfg = eval_cfg or EvalConfig()
    check_settings(cfg, benchmark)
    check_models({"model": model_dir, "gold": gold_dir, "vanilla": vanilla_dir})
    info = init_distributed()
    check_settings(cfg, benchmark, info.world_size)
    bench = prepare_benchmark(data, info)
    auditor = Auditor(
        cfg, bench, data, benchmark, gold_dir, vanilla_dir, info, eval_cfg, ds_path, dtype, seed
    )
    sets = auditor.ctx.sets
    log = get_logger()
    log.info(
        f"audit {model_dir}: attacks {cfg.attacks}, world size {info.world_size}, "
        f"{len(sets.forget_vqa)} forget / {len(sets.retain_vqa)} retain VQA items"
    )
    audit: dict[str, Any] = auditor.audit(model_dir)
    path = Path(out_dir) / "audit.json"
    if info.is_main:
        path = write_audit(audit, out_dir)
        log.info(f"audit: {path} ({audit['elapsed_s']} s)")
    barrier()
    return path
