"""Run under `deepspeed --num_gpus N`: MMUnlearner's alternating schedule, twice from the same
start, to show what may move an unselected weight in a forget step. Used by
tests/test_mmunlearner.py.

    deepspeed --num_gpus 2 tests/ranks/mixed_schedule.py VANILLA BENCH MASK_DIR OUT_JSON ITERS

Each run takes ITERS iterations of (masked forget step, unmasked retain step) with weight decay
> 0, then one last forget step. Run A takes it with the gradient ascent loss; run B with the
loss times 0. So the two differ in one thing: the last forget gradient. Rank 0 reports how many
unselected / selected weights differ between A and B, and how many unselected weights the last
forget step of A moved (Adam momentum left by the retain steps).
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from dsunlearn.config import DataConfig, ModelConfig, OptimConfig
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.engine.batches import global_batches, to_device
from dsunlearn.engine.dist import exit_process, init_distributed
from dsunlearn.engine.engine import build_train_engine, optimizer_step
from dsunlearn.methods.base import example_ce
from dsunlearn.models.encode import encode_examples, logits_of
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.recipes.common import deepspeed_config, prepare_benchmark
from dsunlearn.saliency.apply import MaskedUpdate
from dsunlearn.saliency.store import load_mask
from tests.ranks.masked_update import WEIGHT_DECAY, full_masks, gathered_params


def run(vanilla, bench, masks, info, iters: int, last_scale: float):
    optim = OptimConfig(lr=1e-3, weight_decay=0.0, batch_size=4)
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor(vanilla, ds_config=ds)
    engine = build_train_engine(model, optim, ds)
    update = MaskedUpdate(engine, masks, WEIGHT_DECAY)
    forget = global_batches(vqa_train_examples(bench.forget), 4, info.rank, info.world_size, 0)
    retain = global_batches(vqa_train_examples(bench.retain), 4, info.rank, info.world_size, 1)

    def ce(examples) -> torch.Tensor:
        batch = to_device(encode_examples(processor, examples), info.device)
        return example_ce(logits_of(engine, batch), batch["labels"]).mean()

    def forget_step(scale: float) -> None:
        optimizer_step(engine, -scale * ce(next(forget)), "forget", lambda e: update.before_step(e))

    for _ in range(iters):
        forget_step(1.0)
        optimizer_step(
            engine, ce(next(retain)), "retain", lambda e: update.before_step(e, "retain")
        )
    before = gathered_params(engine)
    forget_step(last_scale)
    return before, gathered_params(engine)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by deepspeed
    vanilla, bench_dir, mask_dir, out_json, iters = args[:5]
    info = init_distributed()
    bench = prepare_benchmark(DataConfig(path=bench_dir), info)
    masks, _ = load_mask(mask_dir, info.rank, info.world_size)
    before_a, after_a = run(vanilla, bench, masks, info, int(iters), 1.0)
    gc.collect()  # the first run's engine
    before_b, after_b = run(vanilla, bench, masks, info, int(iters), 0.0)
    full = full_masks(masks, after_a, info)
    if info.is_main:
        names = list(after_a)
        report = {
            "same_start": all(torch.equal(before_a[n], before_b[n]) for n in names),
            "unselected": sum(int((~full[n]).sum()) for n in names),
            "unselected_differ": sum(
                int((after_a[n] != after_b[n])[~full[n]].sum()) for n in names
            ),
            "selected_differ": sum(int((after_a[n] != after_b[n])[full[n]].sum()) for n in names),
            "unselected_moved_by_last_forget_step": sum(
                int((after_a[n] != before_a[n])[~full[n]].sum()) for n in names
            ),
        }
        with open(out_json, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
    exit_process(0)  # a rank skips finalisation, where gloo threads can abort it
