"""Run under `deepspeed --num_gpus N`: `eval.utility=[pope, mmbench]` on a ZeRO-3 model, the
built-in fixtures written under DATA_ROOT by the main rank while the others wait; rank 0 writes
every greedy answer (gathered in item order) and `score_utility`'s metrics. Used by
tests/test_utility_eval.py.

    deepspeed --num_gpus 2 tests/ranks/utility.py MODEL DATA_ROOT OUT_JSON
"""

from __future__ import annotations

import json
import sys

from dsunlearn.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dsunlearn.engine.dist import barrier, exit_process, init_distributed
from dsunlearn.engine.engine import build_reference_engine
from dsunlearn.eval import utility as U
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.recipes.common import deepspeed_config, is_zero3

# Small: 3 x 4 POPE questions, 4 MMBench questions in every rotation; a batch of 4 per rank.
EVAL = EvalConfig(
    utility=["pope", "mmbench"],
    mmbench_circular=True,
    max_items=4,
    gen_max_new_tokens=3,
    batch_size=8,
)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # set by deepspeed
    model_dir, root, out_json = args[:3]
    info = init_distributed()
    cfg = EVAL
    sets = U.build_utility(cfg, DataConfig(root=root), seed=0)
    optim = OptimConfig(batch_size=info.world_size)
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor(model_dir, ds_config=ds)
    engine = build_reference_engine(model, ds)
    zero3 = is_zero3(ds)
    answers = {
        n: U.generate(engine.module, processor, sets.sets[n].items, cfg, info, zero3)
        for n in sets.names
    }
    metrics = U.score_utility(sets, engine.module, processor, info, zero3, detail=True)
    if info.is_main:
        out = {"world_size": info.world_size, "zero3": zero3, "answers": answers}
        with open(out_json, "w") as f:
            json.dump({**out, "metrics": metrics}, f)
    barrier()
    exit_process(0)  # a rank skips finalisation, where gloo threads can abort it


if __name__ == "__main__":
    main()
