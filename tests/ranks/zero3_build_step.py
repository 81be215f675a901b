"""One process, world size 1 over gloo: each tiny family named on the command line is built
under ZeRO-3 (partitioned at construction, the same weights as without ZeRO) and takes two
optimizer steps that lower the loss. Prints "ZERO3_OK <family> <parameters>" per family, or
exits with "ZERO3_FAIL <family>" after the traceback. Run by tests/conftest.py's
`zero3_build_and_step`, in a subprocess so torch.distributed state cannot leak into pytest's.

    TEST_PORT=PORT python tests/ranks/zero3_build_step.py FAMILY [FAMILY ...]
"""

from __future__ import annotations

import os
import sys
import traceback

import deepspeed
import torch
from PIL import Image

from dsunlearn.engine.dist import init_distributed
from dsunlearn.models import encode_for_loss, load_model_and_processor

DS = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}


def check(name: str) -> int:
    """Build `name` under ZeRO-3, step it twice; its parameter count."""
    plain = dict(load_model_and_processor(name, seed=5)[0].named_parameters())
    model, processor = load_model_and_processor(name, ds_config=DS, seed=5)
    params = list(model.parameters())
    assert all(hasattr(p, "ds_numel") for p in params)
    assert sum(p.numel() for p in params) == 0  # partitioned at construction
    total = sum(p.ds_numel for p in params)
    with deepspeed.zero.GatheredParameters(params):  # same seed, same weights as without ZeRO
        assert all(torch.equal(p, plain[k]) for k, p in model.named_parameters())
    optimizer = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params, config={**DS, "optimizer": optimizer}
    )
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), None]
    batch = encode_for_loss(processor, ["Who is this person?"] * 2, images, ["Alder Quinby"] * 2)
    losses = []
    for _ in range(2):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses
    return total


def main() -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ["TEST_PORT"],
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    init_distributed()  # gloo on CPU, and no JIT build of DeepSpeed's shm op (see dist.py)
    for name in sys.argv[1:]:  # each family in turn, in this one process
        try:
            total = check(name)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"ZERO3_FAIL {name}")
        print("ZERO3_OK", name, total, flush=True)


if __name__ == "__main__":
    main()
