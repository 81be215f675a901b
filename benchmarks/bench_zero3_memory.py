"""Per-rank ZeRO-3 memory (parameters, gradients, optimizer state) and step time vs world size.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/bench_zero3_memory.py
        [--ranks 1 2] [--sizes base wide] [--dtypes fp32 bf16] [--width 512 --layers 8]

writes benchmarks/results/zero3_memory_<device>.json and prints a markdown table.

Every case runs in fresh processes started by the real `deepspeed` launcher (`--num_gpus N`,
one rank included), each rank writing its record to a temporary file that this process merges.
A rank builds a tiny MLLM (`--model`, default tiny-llava) inside `deepspeed.zero.Init`, wraps it
with `build_train_engine` (our AdamW under DeepSpeed's ZeRO-3 optimizer), runs `--steps` full
optimizer steps on a fixed global batch (so Adam's moments exist) and then counts, exactly, the
bytes of the tensors ZeRO-3 keeps on that rank (read from DeepSpeed 0.19's stage3.py):

- param_bytes: the local parameter partitions, `p.ds_tensor` of every parameter (views into
  the optimizer's `lp_param_buffer`);
- grad_bytes: `grad_partitions_flat_buffer`, the flat buffer the reduced gradient partitions
  live in between backward and step (dtype = the model's, DeepSpeed's default grad_accum_dtype);
- optim_bytes: the fp32 master partitions `fp32_partitioned_groups_flat` where they are
  separate storage from the parameter partitions, plus every tensor in the wrapped optimizer's
  `state` (AdamW: exp_avg, exp_avg_sq, step). DeepSpeed 0.19 would reuse fp32 parameter
  partitions as the master copy, but its check compares a torch.device with the accelerator's
  device name (a str), which is False with torch 2.13: fp32 training keeps a separate master
  copy too (`fp32_master_is_param_partition` in the record says which happened).

Tensors are de-duplicated by storage, so a view is never counted twice. The per-rank IPG
bucket (`reduce_bucket_size` elements, allocated once, not sharded) and the frozen reference
model's partitions (`build_reference_engine`, `--no-reference` to skip) are reported beside the
three categories, not inside them. Process memory is context only: `peak_rss` is the process's
VmHWM up to the count (model construction and the steps; the reference model comes after),
`steps_peak_rss_anon` the sampled peak of RssAnon during the counted steps (bench_saliency's
`CpuProbe`); children run with MALLOC_MMAP_THRESHOLD_=128 KiB so RSS follows the live tensors.
On CUDA, `peak_allocated` (torch.cuda.max_memory_allocated) replaces the RSS figures.

The formula the docs use (docs/scaling.md) is evaluated for the same cases: per rank,
bytes_p x Psi_W (params), bytes_g x Psi_W (grads) and 12 x Psi_W (fp32 master + Adam m, v),
with Psi_W = Psi / W ("simple") or sum_i ceil(n_i / W), the padded partition sizes ZeRO-3
really allocates ("padded"; plus AdamW's 4-byte `step` tensor per param group).

Step time is measured last, in its own launches (`--time-size`, fp32 by default), alternating
world sizes `--repeats` times: `--warmup` steps, then the median of `--timed-steps`
forward + backward + optimizer steps, each bracketed by barriers, with the global batch fixed
(`--global-batch` examples split over the ranks). Every rank runs `--threads-per-rank` torch
threads (1: each rank is one "device", as a GPU rank would be). /proc/loadavg is recorded
before and after: on a shared machine the step times are only as good as that load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_saliency import make_probe, proc_status, release_free_heap  # noqa: E402
from quality_runs import machine  # noqa: E402

from dsunlearn.engine.dist import exit_process, free_port  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20
GIB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BYTES = {"fp32": 4, "bf16": 2}
CATEGORIES = ("param_bytes", "grad_bytes", "optim_bytes", "total_bytes")
MMAP_THRESHOLD = 128 * 1024

# Keeps transformers' ZeRO-3 switch alive: it only holds a weakref to this object.
_HF_DS_CONFIG: Any = None


# ---------------------------------------------------------------------------- child: model


def size_overrides(args: argparse.Namespace, size: str) -> dict[str, int]:
    """The text-decoder overrides of a size: none for "base" (the built-in tiny config)."""
    if size == "base":
        return {}
    if args.width % 64:
        raise SystemExit(f"--width {args.width} must be a multiple of 64 (head_dim 64)")
    return {"width": args.width, "layers": args.layers}


def tiny_config(name: str, overrides: dict[str, int]):
    """The built-in tiny processor and config, the decoder widened/deepened by `overrides`.

    Heads keep the tiny models' head_dim of 64 (Qwen2-VL's M-RoPE sections are sized for it);
    the MLP stays 2x the width, as in the built-in configs."""
    from dsunlearn.models.tiny import build_tiny_config, build_tiny_processor

    processor = build_tiny_processor(name)
    config = build_tiny_config(name, processor)
    if overrides:
        text = config.text_config
        width = overrides["width"]
        text.hidden_size = width
        text.intermediate_size = 2 * width
        text.num_hidden_layers = overrides["layers"]
        text.num_attention_heads = text.num_key_value_heads = width // 64
        if hasattr(text, "head_dim"):
            text.head_dim = 64
        vision = config.vision_config
        if getattr(vision, "model_type", "") == "qwen2_vl":  # merger output = text width
            vision.hidden_size = width
    return processor, config


def build_model(name: str, overrides: dict[str, int], dtype: torch.dtype, ds: dict[str, Any]):
    """The model partitioned at construction (`deepspeed.zero.Init` through transformers'
    HfDeepSpeedConfig, as `load_model_and_processor` does), random weights."""
    global _HF_DS_CONFIG
    from transformers import AutoModelForImageTextToText
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from dsunlearn.models.loader import pick_attn_implementation

    processor, config = tiny_config(name, overrides)
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        config, dtype=dtype, attn_implementation=pick_attn_implementation()
    )
    return model, processor


def fixed_batch(processor: Any, info: Any, global_batch: int) -> dict[str, Any]:
    """This rank's share of the first `global_batch` forget-VQA examples (the same every step)."""
    from dsunlearn.config import DataConfig
    from dsunlearn.data.examples import vqa_train_examples
    from dsunlearn.recipes.common import encode_batch, prepare_benchmark

    if global_batch % info.world_size:
        raise SystemExit(f"--global-batch {global_batch} must split over {info.world_size} ranks")
    examples = vqa_train_examples(prepare_benchmark(DataConfig(), info).forget)[:global_batch]
    per_rank = global_batch // info.world_size
    mine = examples[info.rank * per_rank : (info.rank + 1) * per_rank]
    return encode_batch(processor, mine, info.device)


def build(args: argparse.Namespace):
    from dsunlearn.config import OptimConfig
    from dsunlearn.engine.dist import init_distributed
    from dsunlearn.engine.ds_config import fill_ds_config, read_ds_config
    from dsunlearn.engine.engine import build_train_engine

    info = init_distributed()
    if info.device.type == "cpu":
        torch.set_num_threads(args.threads_per_rank)
    optim = OptimConfig(batch_size=args.global_batch)
    ds = fill_ds_config(
        read_ds_config(args.ds_config),
        global_batch=args.global_batch,
        world_size=info.world_size,
        grad_clip=optim.grad_clip,
        bf16=args.dtype == "bf16",
    )
    # Every parameter partitioned, as the formula assumes (zero3_bf16.json keeps params under
    # DeepSpeed's default 1e5 elements whole on every rank; zero3_cpu.json already uses 0).
    ds.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
    overrides = size_overrides(args, args.size)
    model, processor = build_model(args.model, overrides, DTYPES[args.dtype], ds)
    n_params = sum(int(p.ds_numel) for p in model.parameters())
    numels = [int(p.ds_numel) for p in model.parameters() if p.requires_grad]
    engine = build_train_engine(model, optim, ds)
    engine.train()
    batch = fixed_batch(processor, info, args.global_batch)
    return info, ds, engine, batch, n_params, numels


def train_step(engine: Any, batch: dict[str, Any]) -> float:
    from dsunlearn.methods.base import example_ce
    from dsunlearn.models.encode import logits_of

    loss = example_ce(logits_of(engine, batch), batch["labels"]).mean()
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------- child: counting


def _storage_key(t: torch.Tensor) -> tuple[int, int, int]:
    """One key per (storage, offset, size): views of the same bytes count once."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


def tensor_bytes(tensors: list[torch.Tensor], seen: set | None = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def count_zero3_bytes(engine: Any) -> dict[str, Any]:
    """This rank's parameter / gradient / optimizer bytes under ZeRO-3 (see the docstring)."""
    opt = engine.optimizer
    params = [p.ds_tensor for p in engine.module.parameters()]
    seen: set = set()
    param_bytes = tensor_bytes(params, seen)
    grad_buf = getattr(opt, "grad_partitions_flat_buffer", None)
    grad_bytes = tensor_bytes([grad_buf] if grad_buf is not None else [])
    masters = list(opt.fp32_partitioned_groups_flat)
    master_aliases_params = all(_storage_key(m) in seen for m in masters)
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    master_bytes = sum(
        m.numel() * m.element_size()
        for m in masters
        if m.untyped_storage().data_ptr() not in param_storages
    )
    state = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    state_bytes = tensor_bytes(state)
    state_kinds = sorted({k for s in opt.optimizer.state.values() for k in s})
    ipg = [b.buffer for b in getattr(opt, "ipg_buckets", {}).values() if b.buffer is not None]
    return {
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optim_bytes": master_bytes + state_bytes,
        "total_bytes": param_bytes + grad_bytes + master_bytes + state_bytes,
        "optim_master_bytes": master_bytes,
        "optim_state_bytes": state_bytes,
        "optim_state_kinds": state_kinds,
        "fp32_master_is_param_partition": master_aliases_params,
        "param_dtype": str(params[0].dtype),
        "grad_dtype": str(grad_buf.dtype) if grad_buf is not None else None,
        "param_groups": len(masters),
        "ipg_bucket_bytes": tensor_bytes(ipg),
    }


def reference_param_bytes(args: argparse.Namespace, ds: dict[str, Any]) -> int:
    """The frozen reference model (`build_reference_engine`): only its parameter partitions."""
    from dsunlearn.engine.engine import build_reference_engine

    model, _ = build_model(args.model, size_overrides(args, args.size), DTYPES[args.dtype], ds)
    ref = build_reference_engine(model, ds)
    return tensor_bytes([p.ds_tensor for p in ref.module.parameters()])


def child_record_base(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    return {
        "size": args.size,
        "dtype": args.dtype,
        "world_size": info.world_size,
        "rank": info.rank,
        "threads": torch.get_num_threads(),
    }


def run_memory_child(args: argparse.Namespace) -> dict[str, Any]:
    info, ds, engine, batch, n_params, numels = build(args)
    rec = child_record_base(args, info)
    lifetime_hwm = proc_status().get("VmHWM")
    probe = make_probe(info.device)
    release_free_heap()
    probe.reset()
    losses = [train_step(engine, batch) for _ in range(args.steps)]
    steps_peak = probe.peak()
    rec.update(count_zero3_bytes(engine))
    if info.device.type == "cuda":
        rec["peak_allocated"] = int(torch.cuda.max_memory_allocated(info.device))
        rec["peak_rss"] = None
    else:
        # clear_refs reset VmHWM before the steps: the process's peak is the larger of the two.
        rec["peak_rss"] = max(lifetime_hwm or 0, proc_status().get("VmHWM") or 0) or None
        rec["build_peak_rss"] = lifetime_hwm
        rec["steps_peak_rss_anon"] = steps_peak
    rec.update(
        n_params=n_params,
        trainable_numels=numels,
        steps=len(losses),
        losses=losses,
        reduce_bucket_size=ds.get("zero_optimization", {}).get("reduce_bucket_size"),
    )
    if args.reference:
        rec["ref_param_bytes"] = reference_param_bytes(args, ds)
    return rec


def run_time_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    info, _, engine, batch, n_params, _ = build(args)
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        train_step(engine, batch)
    times = []
    for _ in range(args.timed_steps):
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        train_step(engine, batch)
        sync()
        dist.barrier()  # the step is as slow as its slowest rank
        times.append(time.perf_counter() - t0)
    rec = child_record_base(args, info)
    rec.update(n_params=n_params, step_s=times, median_step_s=statistics.median(times))
    return rec


# ---------------------------------------------------------------------------- parent


def child_cmd(args: argparse.Namespace, kind: str, ranks: int, size: str, dtype: str, out: Path):
    launcher = Path(sys.executable).with_name("deepspeed")
    script = [
        str(Path(__file__).resolve()),
        "--child",
        kind,
        "--child-out",
        str(out),
        "--size",
        size,
        "--dtype",
        dtype,
        "--model",
        args.model,
        "--width",
        str(args.width),
        "--layers",
        str(args.layers),
        "--global-batch",
        str(args.global_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--timed-steps",
        str(args.timed_steps),
        "--threads-per-rank",
        str(args.threads_per_rank),
        "--ds-config",
        args.ds_config,
    ]
    if not args.reference:
        script.append("--no-reference")
    port = ["--master_port", str(free_port())]
    return [str(launcher), "--num_gpus", str(ranks), *port, *script]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(args.threads_per_rank)
    return env


def launch(args: argparse.Namespace, kind: str, ranks: int, size: str, dtype: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rec"
        cmd = child_cmd(args, kind, ranks, size, dtype, out)
        print(f"[{kind}] {size} {dtype} x{ranks}:", " ".join(cmd), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(args), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(
                f"child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        recs = [json.loads((Path(tmp) / f"rec.rank{r}.json").read_text()) for r in range(ranks)]
    print(f"    done in {time.time() - t0:.0f} s", flush=True)
    return recs


def padded_numel(numels: list[int], world: int) -> int:
    return sum(math.ceil(n / world) for n in numels)


def predict(numels: list[int], world: int, dtype: str, groups: int) -> dict[str, Any]:
    """The docs' formula for one rank: simple (Psi / W) and padded (what ZeRO-3 allocates)."""
    b = BYTES[dtype]
    out = {}
    for kind, psi_w in (("simple", sum(numels) / world), ("padded", padded_numel(numels, world))):
        p, g, o = b * psi_w, b * psi_w, 12 * psi_w  # fp32 master + Adam m, v
        if kind == "padded":
            o += 4 * groups  # AdamW's `step`, one 0-d fp32 tensor per param group
        out[kind] = {
            "param_bytes": p,
            "grad_bytes": g,
            "optim_bytes": o,
            "total_bytes": p + g + o,
            "ref_param_bytes": b * psi_w,
        }
    return out


def loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def default_ranks() -> list[int]:
    if not torch.cuda.is_available():
        return [1, 2]
    n = torch.cuda.device_count()
    ranks = [r for r in (1, 2, 4, 8, 16) if r <= n]
    return ranks if n in ranks else [*ranks, n]


def run_parent(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = args.ranks or default_ranks()
    base_w = min(ranks)
    t_start = time.time()
    load_before_memory = loadavg()

    cases = []
    for size in args.sizes:
        for dtype in args.dtypes:
            rows, preds = [], {}
            for w in ranks:
                for rec in launch(args, "memory", w, size, dtype):
                    rows.append(rec)
                preds[str(w)] = predict(
                    rows[0]["trainable_numels"], w, dtype, rows[0]["param_groups"]
                )
            base = [r for r in rows if r["world_size"] == base_w]
            ratios = {}
            for w in ranks:
                if w == base_w:
                    continue
                mine = [r for r in rows if r["world_size"] == w]
                ratios[str(w)] = {
                    c: max(r[c] for r in mine) / max(r[c] for r in base)
                    for c in (*CATEGORIES, "ref_param_bytes", "peak_rss", "steps_peak_rss_anon")
                    if all(r.get(c) for r in mine + base)
                }
            trainable = sum(rows[0]["trainable_numels"])
            for r in rows:
                pred = preds[str(r["world_size"])]
                r["measured_over_predicted"] = {
                    kind: {
                        c: r[c] / pred[kind][c]
                        for c in (*CATEGORIES, "ref_param_bytes")
                        if c in r and pred[kind][c]
                    }
                    for kind in ("simple", "padded")
                }
                r.pop("trainable_numels")
            cases.append(
                {
                    "size": size,
                    "dtype": dtype,
                    "overrides": size_overrides(args, size),
                    "n_params": rows[0]["n_params"],
                    "trainable_params": trainable,
                    "rows": rows,
                    "per_rank_ratio_vs_world_1": ratios,
                    "predicted_per_rank": preds,
                }
            )
    load_after_memory = loadavg()

    timing: dict[str, Any] = {}
    if args.repeats > 0:
        load_before = loadavg()
        runs: dict[str, list[dict]] = {str(w): [] for w in ranks}
        for _ in range(args.repeats):
            for w in ranks:
                recs = launch(args, "time", w, args.time_size, args.time_dtype)
                runs[str(w)].append(recs[0])
        load_after = loadavg()
        med = {w: statistics.median(s for r in rs for s in r["step_s"]) for w, rs in runs.items()}
        timing = {
            "size": args.time_size,
            "dtype": args.time_dtype,
            "global_batch": args.global_batch,
            "warmup_steps": args.warmup,
            "timed_steps_per_launch": args.timed_steps,
            "launches_per_world_size": args.repeats,
            "threads_per_rank": args.threads_per_rank,
            "median_step_s": med,
            "median_step_s_each_launch": {
                w: [r["median_step_s"] for r in rs] for w, rs in runs.items()
            },
            "step_time_ratio_vs_world_1": {
                w: med[w] / med[str(base_w)] for w in med if w != str(base_w)
            },
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        }

    import deepspeed
    import transformers

    out = {
        "benchmark": "zero3_per_rank_memory_and_step_time",
        "command": "benchmarks/bench_zero3_memory.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
        },
        "model": args.model,
        "ds_config": args.ds_config,
        "global_batch": args.global_batch,
        "steps_before_count": args.steps,
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "target": "per-rank total_bytes at 2 ranks <= 0.55 x the 1-rank figure",
        "definitions": {
            "param_bytes": "sum of p.ds_tensor bytes (local parameter partitions)",
            "grad_bytes": "grad_partitions_flat_buffer bytes (reduced gradient partitions)",
            "optim_bytes": "fp32 master partitions that are separate storage + optimizer.state "
            "tensors (AdamW exp_avg, exp_avg_sq, step)",
            "total_bytes": "param_bytes + grad_bytes + optim_bytes",
            "ipg_bucket_bytes": "reduce-scatter bucket, reduce_bucket_size elements, not sharded",
            "ref_param_bytes": "frozen reference engine's parameter partitions",
            "peak_rss": "VmHWM up to the count (construction + steps, before the reference model)",
            "build_peak_rss": "VmHWM after engine construction, before the counted steps",
            "steps_peak_rss_anon": "peak RssAnon sampled every 5 ms during the counted steps",
            "predicted_per_rank.simple": "formula with Psi/W elements per rank",
            "predicted_per_rank.padded": "formula with sum_i ceil(n_i/W) elements per rank "
            "(+4 bytes per param group for AdamW's step)",
            "per_rank_ratio_vs_world_1": "max over ranks at W / the 1-rank figure",
        },
        "loadavg": {
            "before_memory": load_before_memory,
            "after_memory": load_after_memory,
        },
        "cases": cases,
        "timing": timing,
        "wall_s": round(time.time() - t_start, 1),
    }
    path = Path(args.out) if args.out else RESULTS / f"zero3_memory_{device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print_summary(out, base_w)
    print(f"wrote {path}")


def print_summary(out: dict[str, Any], base_w: int) -> None:
    print(
        "\n| model | dtype | W | rank | params MiB | grads MiB | optim MiB | total MiB | "
        "ref MiB | peak RSS MiB | total / W=1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in out["cases"]:
        base = max(r["total_bytes"] for r in case["rows"] if r["world_size"] == base_w)
        for r in case["rows"]:
            ref = r.get("ref_param_bytes")
            rss = r.get("peak_rss") or r.get("peak_allocated") or 0
            print(
                f"| {case['size']} ({case['n_params'] / 1e6:.2f}M) | {case['dtype']} | "
                f"{r['world_size']} | {r['rank']} | {r['param_bytes'] / MIB:.3f} | "
                f"{r['grad_bytes'] / MIB:.3f} | {r['optim_bytes'] / MIB:.3f} | "
                f"{r['total_bytes'] / MIB:.3f} | "
                f"{'-' if ref is None else f'{ref / MIB:.3f}'} | {rss / MIB:.0f} | "
                f"{r['total_bytes'] / base:.4f} |"
            )
    t = out["timing"]
    if t:
        print(
            f"\nstep time ({t['size']}, {t['dtype']}, global batch {t['global_batch']}): "
            + ", ".join(f"W={w}: {s * 1e3:.0f} ms" for w, s in t["median_step_s"].items())
            + "; ratio "
            + ", ".join(f"{w}: {x:.3f}" for w, x in t["step_time_ratio_vs_world_1"].items())
            + f"; loadavg {t['loadavg_before']} -> {t['loadavg_after']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=None,
        help="world sizes (CPU: 1 2; CUDA: 1, 2, 4, .. up to the GPU count)",
    )
    ap.add_argument("--model", default="tiny-llava", help="built-in tiny model")
    ap.add_argument(
        "--sizes",
        nargs="+",
        choices=("base", "wide"),
        default=["base", "wide"],
        help="base: the built-in config; wide: decoder of --width x --layers",
    )
    ap.add_argument("--width", type=int, default=512, help="decoder width of the 'wide' size")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 'wide' size")
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    ap.add_argument(
        "--ds-config",
        default=None,
        help="DeepSpeed JSON (default configs/deepspeed/zero3_cpu.json, zero3_bf16.json on CUDA)",
    )
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps before counting")
    ap.add_argument("--repeats", type=int, default=2, help="timing launches per world size")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per timing launch")
    ap.add_argument("--timed-steps", type=int, default=5, help="timed steps per timing launch")
    ap.add_argument("--time-size", choices=("base", "wide"), default="wide")
    ap.add_argument(
        "--time-dtype",
        choices=tuple(DTYPES),
        default=None,
        help="dtype of the timing runs (fp32 on CPU, bf16 on CUDA)",
    )
    ap.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per CPU rank")
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the frozen reference model's partitions",
    )
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    ap.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="base", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the launcher
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.ds_config is None:
        args.ds_config = f"configs/deepspeed/zero3_{'bf16' if cuda else 'cpu'}.json"
    if args.time_dtype is None:
        args.time_dtype = "bf16" if cuda else "fp32"
    if args.child:
        rec = run_memory_child(args) if args.child == "memory" else run_time_child(args)
        out = Path(args.child_out)
        out.with_name(f"{out.stem}.rank{rec['rank']}.json").write_text(json.dumps(rec) + "\n")
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
    exit_process(0)  # a rank skips finalisation, where gloo threads can abort it
