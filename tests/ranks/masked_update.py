"""Run under `deepspeed --num_gpus N`: N masked GA steps with AdamW and weight decay > 0, then
report (rank 0) how many weights outside the mask changed. Used by tests/test_saliency.py.

    deepspeed --num_gpus 2 tests/ranks/masked_update.py VANILLA BENCH MASK_DIR OUT_JSON STEPS \
        [adamw] [lora] [ds=DEEPSPEED_JSON]

With `adamw` (the control) the decay is left to the optimizer's AdamW, which decays every weight.
With `lora` the model trains LoRA adapters (r=4, the default targets), and the mask is theirs.
`ds=` picks the DeepSpeed config (default configs/deepspeed/zero3_cpu.json); one that offloads
the optimizer steps with DeepSpeedCPUAdam on host fp32 buffers.
"""

from __future__ import annotations

import json
import sys

import torch

from dsunlearn.config import DataConfig, LoraConfig, ModelConfig, OptimConfig
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.engine.batches import global_batches, to_device
from dsunlearn.engine.dist import all_reduce_sum, exit_process, init_distributed
from dsunlearn.engine.engine import build_train_engine, optimizer_step
from dsunlearn.methods.base import example_ce
from dsunlearn.models.encode import encode_examples, logits_of
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.models.lora import apply_lora
from dsunlearn.recipes.common import deepspeed_config, prepare_benchmark
from dsunlearn.saliency.apply import MaskedUpdate
from dsunlearn.saliency.store import load_mask

WEIGHT_DECAY = 0.1
DS_DEFAULT = "configs/deepspeed/zero3_cpu.json"


def gathered_params(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter, gathered."""
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[name] = p.detach().clone().cpu().reshape(-1)
    return out


def full_masks(masks: dict[str, torch.Tensor], params: dict[str, torch.Tensor], info):
    """The full mask of each parameter, gathered here only to check invariants."""
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    for name in params:
        local = masks[name].to(torch.uint8)
        parts = [torch.empty_like(local) for _ in range(info.world_size)]
        dist.all_gather(parts, local) if info.world_size > 1 else parts.__setitem__(0, local)
        out[name] = torch.cat(parts).bool()[: params[name].numel()]
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by deepspeed
    vanilla, bench_dir, mask_dir, out_json, steps = args[:5]
    control = "adamw" in args[5:]
    lora = "lora" in args[5:]
    ds_path = next((a[3:] for a in args[5:] if a.startswith("ds=")), DS_DEFAULT)
    info = init_distributed()
    bench = prepare_benchmark(DataConfig(path=bench_dir), info)
    # Decay is the masked update's job; the control hands it to the optimizer instead.
    optim = OptimConfig(lr=1e-3, weight_decay=WEIGHT_DECAY if control else 0.0, batch_size=4)
    ds = deepspeed_config(ds_path, optim, ModelConfig(), info)
    model, processor = load_model_and_processor(vanilla, ds_config=ds)
    if lora:
        model = apply_lora(model, LoraConfig(r=4))
    engine = build_train_engine(model, optim, ds)
    masks, _ = load_mask(mask_dir, info.rank, info.world_size)
    update = MaskedUpdate(engine, masks, 0.0 if control else WEIGHT_DECAY)

    masked_norms: list[float] = []
    norm_gaps: list[float] = []

    def before_step(eng) -> None:
        update.before_step(eng)
        buf = eng.optimizer.grad_partitions_flat_buffer
        sq = all_reduce_sum(buf.double().pow(2).sum().reshape(1))
        masked_norms.append(float(sq.sqrt()))

    start = gathered_params(engine)
    stream = global_batches(vqa_train_examples(bench.forget), 4, info.rank, info.world_size, 0)
    for step in range(int(steps)):
        batch = to_device(encode_examples(processor, next(stream)), info.device)
        loss = -example_ce(logits_of(engine, batch), batch["labels"]).mean()  # gradient ascent
        optimizer_step(engine, loss, f"masked GA step {step}", before_step)
        # Mask, then clip: the norm DeepSpeed clipped by is the masked gradient's.
        clipped_by = float(engine.get_global_grad_norm())
        norm_gaps.append(abs(clipped_by - masked_norms[-1]) / masked_norms[-1])
    end = gathered_params(engine)

    gathered = full_masks(masks, start, info)
    if info.is_main:
        frozen_changed = sum(int((start[n] != end[n])[~gathered[n]].sum()) for n in start)
        selected_moved = sum(int((start[n] != end[n])[gathered[n]].sum()) for n in start)
        report = {
            "world_size": info.world_size,
            "steps": int(steps),
            "weight_decay": WEIGHT_DECAY,
            "decay_by": "the optimizer" if control else "masked update",
            "optimizer": type(engine.optimizer.optimizer).__name__,
            "offload": bool(getattr(engine.optimizer, "offload_optimizer", False)),
            "frozen": sum(int((~gathered[n]).sum()) for n in start),
            "frozen_changed": frozen_changed,
            "selected": sum(int(gathered[n].sum()) for n in start),
            "selected_moved": selected_moved,
            "clip_norm_rel_gap": max(norm_gaps),
        }
        with open(out_json, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
    exit_process(0)  # a rank skips finalisation, where gloo threads can abort it
