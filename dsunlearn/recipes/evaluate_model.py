"""Evaluate one model folder on a benchmark and write a report in the standard shape."""

from __future__ import annotations

import time
from pathlib import Path

from dsunlearn.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dsunlearn.engine.dist import barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_reference_engine
from dsunlearn.eval.evaluate import CHANCE, build_eval_sets, evaluate
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.recipes.common import deepspeed_config, is_zero3, model_dtype, prepare_benchmark
from dsunlearn.report import write_report


def run_eval(
    model_dir: str,
    data: DataConfig,
    eval_cfg: EvalConfig,
    out_dir: str,
    vanilla_dir: str | None = None,
    ds_path: str = "configs/deepspeed/zero3_cpu.json",
    model_cfg: ModelConfig | None = None,
) -> Path:
    """Metrics of `model_dir` (and of `vanilla_dir`, if given, for comparison)."""
    t0 = time.time()
    info = init_distributed()
    log = get_logger()
    model_cfg = model_cfg or ModelConfig(name=model_dir)
    bench = prepare_benchmark(data, info)
    optim = OptimConfig(batch_size=info.world_size)  # inference only: one row per rank
    ds = deepspeed_config(ds_path, optim, model_cfg, info)
    sets = build_eval_sets(bench, eval_cfg)

    def metrics_of(path: str) -> dict[str, float]:
        model, processor = load_model_and_processor(
            path, dtype=model_dtype(model_cfg), ds_config=ds
        )
        engine = build_reference_engine(model, ds)
        return evaluate(engine.module, processor, sets, eval_cfg, info, is_zero3(ds))

    report = {
        "vanilla": metrics_of(vanilla_dir) if vanilla_dir else {},
        "methods": {Path(model_dir).name or model_dir: metrics_of(model_dir)},
        "chance": CHANCE,
        "world_size": info.world_size,
        "elapsed_s": round(time.time() - t0, 2),
    }
    path = Path(out_dir) / "report.json"
    if info.is_main:
        write_report(out_dir, report, title=f"dsunlearn eval: {model_dir}")
        log.info(f"report: {path}")
    barrier()
    return path
