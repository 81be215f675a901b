"""Run under `deepspeed --num_gpus N`: 3 iterations of GA and of MMUnlearner, each once without
and once with activation checkpointing, through the recipe's own iteration
(`recipes.unlearn.train_iteration`); rank 0 writes the largest weight difference between the
two and how often a decoder and a vision layer ran. Used by tests/test_checkpointing.py.

    deepspeed --num_gpus 2 tests/ranks/checkpointing.py VANILLA BENCH OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dsunlearn.config import DataConfig, MaskConfig, MethodConfig, ModelConfig, OptimConfig
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.engine.batches import balanced_batches
from dsunlearn.engine.dist import exit_process, init_distributed
from dsunlearn.engine.engine import build_train_engine
from dsunlearn.engine.preempt import PreemptionFlag
from dsunlearn.methods.base import RunContext, build_method
from dsunlearn.models.loader import enable_activation_checkpointing, load_model_and_processor
from dsunlearn.recipes.common import deepspeed_config, prepare_benchmark
from dsunlearn.recipes.unlearn import train_iteration
from tests.ranks.masked_update import gathered_params

STEPS = 3


def run(method_name: str, checkpointing: bool, vanilla: str, bench, info) -> dict:
    """Weights after STEPS iterations, and how often the MLP of one layer of each tower started.

    A pre-hook on a submodule: the layer's own hooks stay outside the checkpoint, and the
    recompute stops early (inside the MLP) once the saved tensors are regenerated, so a
    forward hook there would never see it."""
    cfg = MethodConfig(
        mmu_max_units=1,
        mmu_retain_per_forget=1,
        mmu_mask=MaskConfig(mode="topk", topk_pct=50.0, modules="both"),
    )
    method = build_method(method_name, cfg)
    optim = method.optim(OptimConfig(lr=1e-3, batch_size=4))
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor(vanilla, ds_config=ds)
    if checkpointing:
        enable_activation_checkpointing(model)
    calls = {"language": 0, "vision": 0}
    layers = {
        "language": model.model.language_model.layers[0].mlp,
        "vision": model.model.vision_tower.encoder.layers[0].mlp,
    }
    for part, layer in layers.items():
        layer.register_forward_pre_hook(
            lambda *_a, part=part: calls.__setitem__(part, calls[part] + 1)
        )
    engine = build_train_engine(model, optim, ds)
    engine.train()
    method.attach(engine, RunContext(bench, processor, info, Path(".")))
    calls.update(language=0, vision=0)  # the steps only, not the saliency pass
    forget = method.forget_examples(bench, processor)
    f_stream = balanced_batches(forget, optim.batch_size, info.rank, info.world_size, 0)
    r_stream = balanced_batches(
        vqa_train_examples(bench.retain), optim.batch_size, info.rank, info.world_size, 1
    )
    n_retain = 1 if method.uses_retain else 0
    fake_run = SimpleNamespace(info=info, processor=processor, ref=None, preempt=PreemptionFlag())
    for step in range(1, STEPS + 1):
        retains = [next(r_stream) for _ in range(n_retain)]
        train_iteration(method, fake_run, engine, step, next(f_stream), retains)
    return {"weights": gathered_params(engine), "calls": dict(calls), "steps": STEPS}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by deepspeed
    vanilla, bench_dir, out_json = args[:3]
    info = init_distributed()
    bench = prepare_benchmark(DataConfig(path=bench_dir), info)
    report: dict[str, dict] = {}
    for name in ("ga", "mmunlearner"):
        plain = run(name, False, vanilla, bench, info)
        ckpt = run(name, True, vanilla, bench, info)
        start, _ = load_model_and_processor(vanilla)
        moved = max(
            float((plain["weights"][n] - p.detach().reshape(-1)).abs().max())
            for n, p in start.named_parameters()
        )
        diff = max(
            float((plain["weights"][n] - ckpt["weights"][n]).abs().max()) for n in plain["weights"]
        )
        report[name] = {
            "max_abs_diff": diff,
            "max_abs_moved": moved,  # the steps did change the weights
            "calls_plain": plain["calls"],
            "calls_checkpointed": ckpt["calls"],
        }
    if info.is_main:
        Path(out_json).write_text(json.dumps(report, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    exit_process(0)  # a rank skips finalisation, where gloo threads can abort it
