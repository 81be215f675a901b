"""Evaluate one model folder on a benchmark and write a report in the standard shape."""

from __future__ import annotations

import time
from pathlib import Path

from dsunlearn.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dsunlearn.engine.dist import barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_reference_engine
from dsunlearn.eval.evaluate import CHANCE, build_eval_sets, evaluate, generate_probe_answers
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

    zero3 = is_zero3(ds)

    def engine_of(path: str):
        model, processor = load_model_and_processor(
            path, dtype=model_dtype(model_cfg), ds_config=ds
        )
        return build_reference_engine(model, ds), processor

    # flu is the perplexity on the original model's probe answers: the vanilla's, when given;
    # otherwise the model's own.
    vanilla_metrics: dict[str, float] = {}
    original: list[str] | None = None
    if vanilla_dir:
        engine, processor = engine_of(vanilla_dir)
        original = generate_probe_answers(engine.module, processor, sets, eval_cfg, info, zero3)
        vanilla_metrics = evaluate(
            engine.module, processor, sets, eval_cfg, info, zero3, probe_answers=original
        )
        del engine
    engine, processor = engine_of(model_dir)
    model_metrics = evaluate(
        engine.module, processor, sets, eval_cfg, info, zero3, original_answers=original
    )

    report = {
        "vanilla": vanilla_metrics,
        "methods": {Path(model_dir).name or model_dir: model_metrics},
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
