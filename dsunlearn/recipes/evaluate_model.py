"""Evaluate one model folder on a benchmark, by that benchmark's own protocol
(`dsunlearn/eval/benchmarks/`), beside the original (vanilla) and gold models when given, and
write a report in the standard shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsunlearn.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dsunlearn.engine.dist import barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_reference_engine
from dsunlearn.eval.benchmarks import Scored, build_protocol
from dsunlearn.eval.evaluate import CHANCE
from dsunlearn.eval.verdict import versus_gold
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.recipes.common import deepspeed_config, is_zero3, model_dtype
from dsunlearn.report import write_report


def run_eval(
    model_dir: str,
    data: DataConfig,
    eval_cfg: EvalConfig,
    out_dir: str,
    vanilla_dir: str | None = None,
    ds_path: str = "configs/deepspeed/zero3_cpu.json",
    model_cfg: ModelConfig | None = None,
    benchmark: str = "builtin",
    gold_dir: str | None = None,
    split: str = "test",
) -> Path:
    """Metrics of `model_dir` on `benchmark`'s `split`, and of `vanilla_dir` and `gold_dir`
    if given (the vanilla model is the reference of flu, MIA recall and C-Dis; the gold model
    gives every other row its forget quality and gap); every rank takes part."""
    t0 = time.time()
    protocol = build_protocol(benchmark, data, eval_cfg)
    info = init_distributed()
    log = get_logger()
    model_cfg = model_cfg or ModelConfig(name=model_dir)
    optim = OptimConfig(batch_size=info.world_size)  # inference only: one row per rank
    ds = deepspeed_config(ds_path, optim, model_cfg, info)
    zero3 = is_zero3(ds)
    sets = protocol.build(split)

    def score(path: str, original: Scored | None) -> Scored:
        model, processor = load_model_and_processor(
            path, dtype=model_dtype(model_cfg), ds_config=ds
        )
        engine = build_reference_engine(model, ds)
        return protocol.score(engine.module, processor, sets, info, zero3, original)

    vanilla = score(vanilla_dir, None) if vanilla_dir else None
    gold = score(gold_dir, vanilla) if gold_dir else None
    evaluated = score(model_dir, vanilla)
    name = Path(model_dir).name or model_dir
    if name in ("vanilla", "gold"):  # the report's own row names: keep the evaluated row apart
        name = f"{name} (evaluated)"
    facts = protocol.facts(sets, with_original=vanilla is not None)
    report: dict[str, Any] = {
        "vanilla": vanilla.metrics if vanilla else {},
        "methods": {name: evaluated.metrics},
        "chance": facts.get("chance", CHANCE),  # a protocol whose chance is not 1 in 4 says so
        "world_size": info.world_size,
        "elapsed_s": round(time.time() - t0, 2),
        "benchmark": {
            "name": benchmark,
            "data": protocol.path,
            "split": split,
            "split_rule": protocol.split_rule(),
            **facts,
        },
    }
    if gold is not None:
        report["gold"] = gold.metrics
        rows = {name: evaluated, **({"vanilla": vanilla} if vanilla else {})}
        report["vs_gold"] = versus_gold(rows, gold)
    if "judge" in report["benchmark"]:
        report["judge"] = report["benchmark"]["judge"]
    path = Path(out_dir) / "report.json"
    if info.is_main:
        write_report(out_dir, report, title=f"dsunlearn eval ({benchmark}): {model_dir}")
        log.info(f"report: {path}")
    barrier()
    return path
