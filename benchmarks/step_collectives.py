"""2-rank unlearning iteration time: one collective per iteration (now) against the old
sequence of small all-reduces (finite-loss check and loss mean per step, then the preemption
flag), measured in one launch, on the same engine, alternating.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/step_collectives.py [--iters 10 --rounds 6]

writes benchmarks/results/step_collectives_cpu.json.

The iteration is GradDiff's (a forget step and one retain step) on the built-in tiny-llava
under ZeRO-3 (zero3_cpu.json), global batch 4 on 2 ranks, 1 torch thread per rank. "old"
rebuilds the sequence the loop made before issue 17 from the same primitives (`check_finite`
before each backward, a loss all-reduce after each step, `PreemptionFlag.requested` at the
boundary): 5 of our all-reduces per iteration. "new" is `recipes.unlearn.train_iteration`:
1. Every dist.all_reduce is counted (DeepSpeed's own, e.g. the gradient norm, included), so
the difference between the modes is ours. The modes alternate in blocks of `--iters`
iterations, `--rounds` times; the figure is the median iteration time of each mode.

On CPU ranks with gloo on one machine a small all-reduce costs well under a millisecond, far
less than a step of even the tiny model, so the ratio here is close to 1. The point of one
collective is GPUs: each small all-reduce with a `.item()` after it stalls the host until the
device queue drains, which is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "step_collectives_cpu.json"


def rank_main(bench_dir: str, out: str, iters: int, rounds: int) -> None:
    import torch.distributed as dist

    from dsunlearn.config import DataConfig, MethodConfig, ModelConfig, OptimConfig
    from dsunlearn.data.examples import vqa_train_examples
    from dsunlearn.engine.batches import balanced_batches
    from dsunlearn.engine.dist import all_reduce_sum, exit_process, init_distributed
    from dsunlearn.engine.engine import build_train_engine, optimizer_step
    from dsunlearn.engine.preempt import PreemptionFlag
    from dsunlearn.methods.base import build_method
    from dsunlearn.models.loader import load_model_and_processor
    from dsunlearn.recipes.common import deepspeed_config, encode_batch, prepare_benchmark
    from dsunlearn.recipes.unlearn import train_iteration

    info = init_distributed()
    bench = prepare_benchmark(DataConfig(path=bench_dir), info)
    method = build_method("graddiff", MethodConfig())
    optim = OptimConfig(lr=1e-5, batch_size=4)
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor("tiny-llava", ds_config=ds)
    engine = build_train_engine(model, optim, ds)
    engine.train()
    preempt = PreemptionFlag()
    run = SimpleNamespace(info=info, processor=processor, ref=None, preempt=preempt)
    f = balanced_batches(vqa_train_examples(bench.forget), 4, info.rank, info.world_size, 0)
    r = balanced_batches(vqa_train_examples(bench.retain), 4, info.rank, info.world_size, 1)

    calls = [0]
    real_all_reduce = dist.all_reduce

    def counting(*a, **k):
        calls[0] += 1
        return real_all_reduce(*a, **k)

    dist.all_reduce = counting

    def old_iteration(step: int) -> None:
        for kind, examples in (("forget", next(f)), ("retain", next(r))):
            batch = encode_batch(processor, examples, info.device)
            fn = method.forget_loss if kind == "forget" else method.retain_loss
            loss = fn(engine, batch, None)
            optimizer_step(engine, loss, f"{kind} step {step}")  # check_finite: 1 all-reduce
            float(all_reduce_sum(loss.detach().float().reshape(1)).item())  # the loss mean
        preempt.requested(info.device)  # the flag

    def new_iteration(step: int) -> None:
        train_iteration(method, run, engine, step, next(f), [next(r)])

    times: dict[str, list[float]] = {"old": [], "new": []}
    counts: dict[str, list[int]] = {"old": [], "new": []}
    step = 0
    for _ in range(2):  # warm-up
        step += 1
        new_iteration(step)
    for k in range(rounds):
        for mode in ("old", "new") if k % 2 == 0 else ("new", "old"):
            fn = old_iteration if mode == "old" else new_iteration
            for _ in range(iters):
                step += 1
                dist.barrier()
                calls[0] = 0
                tick = time.perf_counter()
                fn(step)
                times[mode].append(time.perf_counter() - tick)
                counts[mode].append(calls[0])
    if info.is_main:
        Path(out).write_text(json.dumps({"times": times, "all_reduce_calls": counts}))
    dist.barrier()
    exit_process(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rank", nargs=2, help=argparse.SUPPRESS)  # internal: bench dir, out file
    args, _ = ap.parse_known_args()
    if args.rank:
        rank_main(args.rank[0], args.rank[1], args.iters, args.rounds)
        return

    from dsunlearn.data.builtin import build_benchmark
    from dsunlearn.engine.dist import free_port
    from dsunlearn.recipes.demo import launch_env

    with tempfile.TemporaryDirectory() as tmp:
        bench = build_benchmark(Path(tmp) / "b6", seed=0, entities=6)
        raw = Path(tmp) / "raw.json"
        launcher = Path(sys.executable).with_name("deepspeed")
        cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
        cmd += [__file__, "--rank", str(bench), str(raw)]
        cmd += ["--iters", str(args.iters), "--rounds", str(args.rounds)]
        env = launch_env(2) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        data = json.loads(raw.read_text())
    med = {m: statistics.median(t) for m, t in data["times"].items()}
    calls = {m: sorted(set(c)) for m, c in data["all_reduce_calls"].items()}
    result = {
        "what": "2-rank GradDiff iteration (forget + 1 retain step), tiny-llava, ZeRO-3, CPU",
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "iterations_per_mode": len(data["times"]["old"]),
        "median_s": med,
        "new_over_old": med["new"] / med["old"],
        "all_reduce_calls_per_iteration": calls,
        "loadavg_before_after": [load_before, load_after],
        "times_s": data["times"],
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=1))


if __name__ == "__main__":
    main()
