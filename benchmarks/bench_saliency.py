"""Cost of the saliency pass against a plain forward + backward of the same micro-batches.

Time (default; one process, ZeRO-3 engine, world size 1; writes results/saliency_<device>.json):

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/bench_saliency.py [--units 20] [--model DIR]

Both loops run the same micro-batches of the forget VQA, forward + backward with gradients
accumulating, then clear the gradients; the saliency loop also reads each parameter's local fp32
gradient partition and adds g^2 to its buffer (`dsunlearn.saliency.scores.accumulate_units`).
Alternating the two loops unit by unit keeps machine noise out of the ratio.

Peak memory (writes results/saliency_memory_<device>.json):

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/bench_saliency.py --memory [--ranks 1 2]

A process's peak RSS only ever grows, so one process cannot measure two loops one after the
other: each variant (plain, saliency) runs in fresh child processes (`--memory-child`, through
the `deepspeed` launcher for more than one rank), `--repeats` times, alternating. A child builds
the engine as the timing mode does, runs warm-up units of plain forward + backward, returns free
heap pages to the OS, records its memory (baseline), then runs the measured units and records
the peak; the saliency child allocates its `Scores` inside the measured region. On CPU, torch's
tensors are the process's anonymous memory, so the child samples RssAnon (see `CpuProbe`); on
CUDA it reads torch.cuda's allocated-bytes counters instead. glibc raises its mmap threshold
as mmapped blocks are freed (up to 32 MiB), after which freed tensors stay in the heap and a
loop's peak RSS depends on fragmentation; the children therefore run with a fixed
MALLOC_MMAP_THRESHOLD_ (128 KiB, glibc's starting value; 0 keeps the dynamic default), so
every tensor of 128 KiB or more is its own mapping and RSS follows the live tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsunlearn.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from dsunlearn.data.examples import vqa_train_examples  # noqa: E402
from dsunlearn.engine.batches import to_device  # noqa: E402
from dsunlearn.engine.dist import (  # noqa: E402
    DistInfo,
    exit_process,
    free_port,
    init_distributed,
)
from dsunlearn.engine.engine import build_train_engine  # noqa: E402
from dsunlearn.methods.base import example_ce  # noqa: E402
from dsunlearn.models.encode import encode_examples, logits_of  # noqa: E402
from dsunlearn.models.loader import load_model_and_processor  # noqa: E402
from dsunlearn.recipes.common import deepspeed_config, prepare_benchmark  # noqa: E402
from dsunlearn.saliency.scores import Scores, accumulate_units  # noqa: E402

DEFAULT_MODEL = REPO / "checkpoints" / "vanilla" / "tiny-llava-seed0-e20-a1f76de313"
RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20
VARIANTS = ("plain", "saliency")

Unit = list[dict[str, Any]]


@dataclass
class Setup:
    info: DistInfo
    engine: Any
    named: list[tuple[str, torch.nn.Parameter]]
    units: list[Unit]

    def loss_fn(self, eng: Any, batch: dict[str, Any]) -> torch.Tensor:
        return example_ce(logits_of(eng, batch), batch["labels"]).mean()

    def plain(self, unit: Unit) -> None:
        """Forward + backward of this rank's micro-batches, gradients accumulating, then clear."""
        for batch in unit:
            self.engine.backward(self.loss_fn(self.engine, batch) / len(unit), scale_wrt_gas=False)
        self.engine.optimizer.zero_grad()

    def saliency(self, scores: Scores, unit: Unit) -> None:
        accumulate_units(self.engine, self.named, scores.forget, iter([unit]), self.loss_fn)


def build(args: argparse.Namespace, n_units: int) -> Setup:
    """ZeRO-3 engine on the vanilla model and `n_units` units of forget-VQA micro-batches; each
    rank keeps its share of every unit's micro-batches (all of them on one rank)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = init_distributed()
    if args.micro_batches % info.world_size:
        raise SystemExit(f"--micro-batches {args.micro_batches} must split over {info.world_size}")
    bench = prepare_benchmark(DataConfig(), info)
    optim = OptimConfig(batch_size=args.unit_batch)
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor(args.model, ds_config=ds)
    engine = build_train_engine(model, optim, ds)
    engine.train()
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    examples = vqa_train_examples(bench.forget)
    per_micro = args.unit_batch // args.micro_batches
    batches = [
        to_device(encode_examples(processor, examples[i : i + per_micro]), info.device)
        for i in range(0, n_units * args.unit_batch, per_micro)
        if len(examples[i : i + per_micro]) == per_micro
    ]
    mine = args.micro_batches // info.world_size
    units = [
        batches[i : i + args.micro_batches][info.rank * mine : (info.rank + 1) * mine]
        for i in range(0, len(batches) - args.micro_batches + 1, args.micro_batches)
    ]
    return Setup(info, engine, named, units)


def machine_name(device: str) -> str:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}"


# ---------------------------------------------------------------------------- timing


def run_timing(args: argparse.Namespace) -> None:
    s = build(args, args.units)
    scores = Scores.zeros(s.named, s.info.device)

    def saliency(unit: Unit) -> None:
        s.saliency(scores, unit)

    s.plain(s.units[0])  # warm-up of both paths
    saliency(s.units[0])
    times: dict[str, list[float]] = {"plain": [], "saliency": []}
    for unit in s.units:
        for name, fn in (("plain", s.plain), ("saliency", saliency)):
            t0 = time.perf_counter()
            fn(unit)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["saliency"] / med["plain"]
    device = s.info.device.type
    out = {
        "benchmark": "saliency_unit_vs_plain_fwd_bwd",
        "command": "benchmarks/bench_saliency.py " + " ".join(sys.argv[1:]),
        "machine": machine_name(device),
        "threads": torch.get_num_threads(),
        "model": Path(args.model).name,
        "unit_batch": args.unit_batch,
        "micro_batches": args.micro_batches,
        "units_timed": len(s.units),
        "median_s": med,
        "ratio_saliency_over_plain": ratio,
        "score_bytes": scores.nbytes(),
        "date": time.strftime("%Y-%m-%d"),
    }
    path = Path(args.out) if args.out else RESULTS / f"saliency_{device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"| {out['machine']} | {len(s.units)} units of {args.unit_batch} | "
        f"{med['plain'] * 1e3:.1f} ms | {med['saliency'] * 1e3:.1f} ms | {ratio:.3f} |"
    )
    print(f"wrote {path}")


# ---------------------------------------------------------------------------- memory probes


def proc_status() -> dict[str, int]:
    """The memory fields (kB in the file) of /proc/self/status in bytes; {} off Linux."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if rest.strip().endswith(" kB"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def reset_hwm() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM (peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    st = proc_status()
    return bool(st) and st["VmHWM"] <= st["VmRSS"] + 1024 * 1024


class Probe:
    """This process's (or device's) memory: `current()` now, `peak()` since `reset()`, and
    `details()` for secondary figures."""

    method = ""

    def current(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def peak(self) -> int:
        raise NotImplementedError

    def details(self) -> dict[str, Any]:
        return {}


class CpuProbe(Probe):
    """Peak anonymous RSS, sampled every 5 ms by a thread.

    Torch's CPU tensors are anonymous memory (RssAnon). Total RSS also counts file-backed pages
    (code, shared libraries) that the kernel drops and reloads when the machine runs short of
    memory, which moves it by 100+ MiB regardless of the loop; the anonymous part does not move
    that way without swap. The kernel's exact peak of total RSS (VmHWM, reset through
    /proc/self/clear_refs) and RssFile before/after are kept as secondary figures; off Linux the
    sampled figure is psutil's total RSS.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._linux = "RssAnon" in proc_status()
        self.method = (
            "RssAnon of /proc/self/status sampled every 5 ms"
            if self._linux
            else "psutil RSS sampled every 5 ms"
        )
        self._interval = interval_s
        self._max = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm_reset = False
        self._before: dict[str, int] = {}
        self._after: dict[str, int] = {}

    def current(self) -> int:
        if self._linux:
            return proc_status()["RssAnon"]
        return int(self._proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._max = max(self._max, self.current())
            self._samples += 1

    def reset(self) -> None:
        self._before = proc_status()
        self._hwm_reset = reset_hwm()
        self._max = self.current()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def peak(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._after = proc_status()
        return max(self._max, self.current())

    def details(self) -> dict[str, Any]:
        if not self._before:
            return {"samples": self._samples}
        out: dict[str, Any] = {
            "samples": self._samples,
            "rss_total_before_mib": self._before["VmRSS"] / MIB,
            "rss_file_before_mib": self._before.get("RssFile", 0) / MIB,
            "rss_file_after_mib": self._after.get("RssFile", 0) / MIB,
        }
        if self._hwm_reset:
            out["vm_hwm_mib"] = self._after["VmHWM"] / MIB
            out["vm_hwm_minus_rss_before_mib"] = (
                self._after["VmHWM"] - self._before["VmRSS"]
            ) / MIB
        return out


class CudaProbe(Probe):
    """torch.cuda's allocated bytes on this rank's device (not the process's RSS)."""

    method = "torch.cuda.memory_allocated / max_memory_allocated after reset_peak_memory_stats"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))


def make_probe(device: torch.device) -> Probe:
    return CudaProbe(device) if device.type == "cuda" else CpuProbe()


def release_free_heap() -> None:
    """Collect garbage and hand glibc's free heap pages back to the OS, so a later allocation
    shows in RSS instead of silently reusing pages that the warm-up left resident."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
            ctypes.CDLL(libc).malloc_trim(0)


# ---------------------------------------------------------------------------- memory child


def run_memory_child(args: argparse.Namespace) -> None:
    """One variant in this fresh process: warm-up, baseline, reset, measured units, peak."""
    s = build(args, args.warmup + args.units)
    if len(s.units) < args.warmup + args.units:
        raise SystemExit(f"only {len(s.units)} units of forget data")
    warm, measured = s.units[: args.warmup], s.units[args.warmup :]
    for unit in warm:  # the same plain warm-up in both children
        s.plain(unit)
    probe = make_probe(s.info.device)
    release_free_heap()
    if s.info.device.type == "cuda":
        torch.cuda.empty_cache()
    baseline = probe.current()
    probe.reset()
    rec: dict[str, Any] = {
        "rank": s.info.rank,
        "world_size": s.info.world_size,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    if args.memory_child == "plain":
        for unit in measured:
            s.plain(unit)
    else:
        scores = Scores.zeros(s.named, s.info.device)
        rec["after_scores_mib"] = (probe.current() - baseline) / MIB
        for unit in measured:
            s.saliency(scores, unit)
        rec["score_mib"] = scores.nbytes() / MIB
    peak = probe.peak()
    rec.update(
        method=probe.method,
        units=len(measured),
        **probe.details(),
        baseline_mib=baseline / MIB,
        peak_mib=peak / MIB,
        extra_mib=(peak - baseline) / MIB,
    )
    out = Path(args.child_out)
    out.with_name(f"{out.stem}.rank{s.info.rank}.json").write_text(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------- memory parent


def child_cmd(args: argparse.Namespace, variant: str, ranks: int, out: Path) -> list[str]:
    script = [
        str(Path(__file__).resolve()),
        "--memory-child",
        variant,
        "--child-out",
        str(out),
        "--units",
        str(args.units),
        "--warmup",
        str(args.warmup),
        "--model",
        args.model,
        "--unit-batch",
        str(args.unit_batch),
        "--micro-batches",
        str(args.micro_batches),
    ]
    if ranks == 1:
        return [sys.executable, *script]
    launcher = Path(sys.executable).with_name("deepspeed")
    port = ["--master_port", str(free_port())]
    return [str(launcher), "--num_gpus", str(ranks), *port, *script]


def summarise(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one variant on one rank, and each repeat's extra."""
    out: dict[str, Any] = {
        k: statistics.median(rec[k] for rec in recs)
        for k in ("baseline_mib", "peak_mib", "extra_mib")
    }
    out["extra_mib_each"] = [rec["extra_mib"] for rec in recs]
    return out


def measure(args: argparse.Namespace, ranks: int, env: dict[str, str]) -> list[dict[str, Any]]:
    """Both variants on `ranks` ranks, `args.repeats` fresh launches each, alternating."""
    # per_variant[variant][rank]: one child record per repeat.
    per_variant: dict[str, list[list[dict[str, Any]]]] = {
        v: [[] for _ in range(ranks)] for v in VARIANTS
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for variant in VARIANTS:
                out = Path(tmp) / f"{variant}{rep}"
                cmd = child_cmd(args, variant, ranks, out)
                print("running:", " ".join(cmd), flush=True)
                subprocess.run(cmd, cwd=REPO, env=env, check=True)
                for r in range(ranks):
                    rec = json.loads((Path(tmp) / f"{variant}{rep}.rank{r}.json").read_text())
                    per_variant[variant][r].append(rec)
    per_rank = []
    for r in range(ranks):
        plain, sal = summarise(per_variant["plain"][r]), summarise(per_variant["saliency"][r])
        score = per_variant["saliency"][r][0]["score_mib"]
        extra = sal["extra_mib"] - plain["extra_mib"]
        per_rank.append(
            {
                "rank": r,
                "score_mib": score,
                "plain": plain,
                "saliency": sal,
                "saliency_minus_plain_peak_mib": sal["peak_mib"] - plain["peak_mib"],
                "saliency_minus_plain_extra_mib": extra,
                "ratio_saliency_extra_over_score_bytes": extra / score,
                "children": per_variant["plain"][r] + per_variant["saliency"][r],
            }
        )
    return per_rank


def run_memory(args: argparse.Namespace) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    for threshold in args.malloc_mmap_threshold:
        for ranks in args.ranks:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
            if threshold > 0:
                env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
            if device == "cpu":
                env.setdefault("DS_ACCELERATOR", "cpu")
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
            runs.append(
                {
                    "world_size": ranks,
                    "malloc_mmap_threshold": threshold or "glibc default (dynamic)",
                    "omp_threads": env.get("OMP_NUM_THREADS"),
                    "per_rank": measure(args, ranks, env),
                }
            )
    out = {
        "benchmark": "saliency_pass_peak_memory",
        "command": "benchmarks/bench_saliency.py " + " ".join(sys.argv[1:]),
        "machine": machine_name(device),
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(args.model).name,
        "unit_batch": args.unit_batch,
        "micro_batches": args.micro_batches,
        "warmup_units": args.warmup,
        "measured_units": args.units,
        "repeats": args.repeats,
        "method": runs[0]["per_rank"][0]["children"][0]["method"],
        "definitions": {
            "baseline_mib, peak_mib, extra_mib": "medians over the repeats (fresh processes)",
            "baseline_mib": "`method` after the plain warm-up units, gc and malloc_trim",
            "peak_mib": "peak of `method` over the measured loop (saliency: Scores.zeros too)",
            "extra_mib": "peak_mib - baseline_mib",
            "score_mib": "Scores.nbytes(): 2 x fp32 x this rank's partition",
            "ratio_saliency_extra_over_score_bytes": "(saliency extra - plain extra) / score_mib",
            "vm_hwm_minus_rss_before_mib": "secondary: the kernel's peak of total RSS minus total "
            "RSS before the loop; file-backed pages that the kernel evicts and reloads move it",
        },
        "runs": runs,
    }
    path = Path(args.out) if args.out else RESULTS / f"saliency_memory_{device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("| mmap threshold | ranks | rank | variant | baseline | peak | peak - baseline (each) |")
    for run in runs:
        for row in run["per_rank"]:
            for v in VARIANTS:
                m = row[v]
                each = ", ".join(f"{x:.1f}" for x in m["extra_mib_each"])
                print(
                    f"| {run['malloc_mmap_threshold']} | {run['world_size']} | {row['rank']} | "
                    f"{v} | {m['baseline_mib']:.1f} | {m['peak_mib']:.1f} | "
                    f"{m['extra_mib']:.1f} ({each}) |"
                )
            print(
                f"  score {row['score_mib']:.1f} MiB, saliency - plain: peak "
                f"{row['saliency_minus_plain_peak_mib']:.1f} MiB, extra "
                f"{row['saliency_minus_plain_extra_mib']:.1f} MiB, ratio "
                f"{row['ratio_saliency_extra_over_score_bytes']:.3f}"
            )
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=None, help="timed units (20) / measured (4)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--unit-batch", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/...)")
    ap.add_argument("--memory", action="store_true", help="peak memory, one process a variant")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1], help="world sizes (--memory)")
    ap.add_argument("--warmup", type=int, default=2, help="plain warm-up units (--memory)")
    ap.add_argument("--repeats", type=int, default=3, help="processes per variant (--memory)")
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        nargs="+",
        default=[128 * 1024],
        help="MALLOC_MMAP_THRESHOLD_ of the children, bytes; 0: glibc's dynamic default",
    )
    ap.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the launcher
    args = ap.parse_args()
    if args.memory_child or args.memory:
        args.units = 4 if args.units is None else args.units
        if args.memory_child:
            run_memory_child(args)
        else:
            run_memory(args)
    else:
        args.units = 20 if args.units is None else args.units
        run_timing(args)


if __name__ == "__main__":
    main()
    exit_process(0)  # a rank skips finalisation, where gloo threads can abort it
