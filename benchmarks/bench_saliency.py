"""Time of one saliency unit against a plain forward + backward of the same micro-batches.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/bench_saliency.py [--units 20] [--model DIR]

One process, ZeRO-3 engine (world size 1). Both loops run the same micro-batches of the forget
VQA, forward + backward with gradients accumulating, then clear the gradients; the saliency
loop also reads each parameter's local fp32 gradient partition and adds g^2 to its buffer
(`dsunlearn.saliency.scores.accumulate_units`). Alternating the two loops unit by unit keeps
machine noise out of the ratio. Writes benchmarks/results/saliency_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsunlearn.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from dsunlearn.data.examples import vqa_train_examples  # noqa: E402
from dsunlearn.engine.batches import to_device  # noqa: E402
from dsunlearn.engine.dist import init_distributed  # noqa: E402
from dsunlearn.engine.engine import build_train_engine  # noqa: E402
from dsunlearn.methods.base import example_ce  # noqa: E402
from dsunlearn.models.encode import encode_examples, logits_of  # noqa: E402
from dsunlearn.models.loader import load_model_and_processor  # noqa: E402
from dsunlearn.recipes.common import deepspeed_config, prepare_benchmark  # noqa: E402
from dsunlearn.saliency.scores import Scores, accumulate_units  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "vanilla" / "tiny-llava-seed0-e20-a1f76de313"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=20)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--unit-batch", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = init_distributed()
    bench = prepare_benchmark(DataConfig(), info)
    optim = OptimConfig(batch_size=args.unit_batch)
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor(args.model, ds_config=ds)
    engine = build_train_engine(model, optim, ds)
    engine.train()
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    scores = Scores.zeros(named, info.device)
    examples = vqa_train_examples(bench.forget)
    per_micro = args.unit_batch // args.micro_batches
    batches = [
        to_device(encode_examples(processor, examples[i : i + per_micro]), info.device)
        for i in range(0, args.units * args.unit_batch, per_micro)
        if len(examples[i : i + per_micro]) == per_micro
    ]
    units = [
        batches[i : i + args.micro_batches] for i in range(0, len(batches), args.micro_batches)
    ]

    def loss_fn(eng, batch):
        return example_ce(logits_of(eng, batch), batch["labels"]).mean()

    def plain(unit) -> None:
        for batch in unit:
            engine.backward(loss_fn(engine, batch) / len(unit), scale_wrt_gas=False)
        engine.optimizer.zero_grad()

    def saliency(unit) -> None:
        accumulate_units(engine, named, scores.forget, iter([unit]), loss_fn)

    plain(units[0])  # warm-up of both paths
    saliency(units[0])
    times = {"plain": [], "saliency": []}
    for unit in units:
        for name, fn in (("plain", plain), ("saliency", saliency)):
            t0 = time.perf_counter()
            fn(unit)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["saliency"] / med["plain"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {
        "benchmark": "saliency_unit_vs_plain_fwd_bwd",
        "command": "benchmarks/bench_saliency.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        + (torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"),
        "threads": torch.get_num_threads(),
        "model": Path(args.model).name,
        "unit_batch": args.unit_batch,
        "micro_batches": args.micro_batches,
        "units_timed": len(units),
        "median_s": med,
        "ratio_saliency_over_plain": ratio,
        "score_bytes": scores.nbytes(),
        "date": time.strftime("%Y-%m-%d"),
    }
    path = REPO / "benchmarks" / "results" / f"saliency_{device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"| {out['machine']} | {len(units)} units of {args.unit_batch} | "
        f"{med['plain'] * 1e3:.1f} ms | {med['saliency'] * 1e3:.1f} ms | {ratio:.3f} |"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
