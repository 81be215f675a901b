"""CPU time and memory of the lm_head + per-token loss ops: full logits (eager) vs chunked (torch).

    .venv/bin/python benchmarks/bench_logits_memory.py [--bt 4096] [--vocab 151936]
        [--hidden 3584] [--dtypes fp32,bf16] [--variants ce-eager,ce-chunked,...]
        [--repeats 1] [--chunk-rows R] [--device cpu|cuda]
        [--out benchmarks/results/logits_memory_<device>.json]

Defaults are Qwen2-VL-7B's head (V = 151,936, H = 3584) at B*T = 4096 answer tokens. The eager
variants then need about 10 GB (fp32 CE) to 15 GB (fp32 KL) of RAM besides their inputs: run it
on a quiet machine (timings taken while other jobs run are meaningless). --chunk-rows overrides
the ops' default chunk (256 MiB of fp32 logits on CPU), e.g. to make a small check chunk at all.

Variants (one forward + backward each; gradients of h and weight, none for the reference):

  ce-eager          z = F.linear(h, W).float() over all rows, F.cross_entropy per token, the
                    loss sum_i w_i ce_i (w = 1/N): what every method did before issue 17 §2
  ce-chunked        `kernels.linear_logprob.linear_logprob(weights=...)`, backend "torch":
                    gradients computed in forward, chunk by chunk (the GA/GradDiff/MMUnlearner
                    and saliency path)
  ce-recompute      the same op with per-token outputs (no weights): backward re-makes each
                    chunk's logits (NPO's path; one more matmul)
  kl-eager          both models' full logits, `kernels.linear_kl_ce.kl_ce_from_logits`, the loss
                    sum_i w_i (ce_i + kl_i) (KL_Min's retain loss)
  kl-chunked        `kernels.linear_kl_ce.linear_kl_ce(weights=...)`, backend "torch"

Each (variant, dtype) runs in a fresh subprocess (with MALLOC_MMAP_THRESHOLD_=131072, so that
freed buffers go back to the OS and RSS falls when they are freed). In it: the inputs are made
(h [N, H], W [V, H] and, for KL, ref_h and ref_W, in the dtype; labels; std H^-0.5 weights), gc,
then RSS is sampled every 2 ms (/proc/self/statm) by a thread over the forward + backward.

Counted, per run (MiB):
  rss_before    RSS after the inputs exist, just before the step
  peak_extra    max sampled RSS during the step - rss_before
  outputs       bytes the step must leave behind: grad of h (N x H) + grad of W (V x H), in the
                inputs' dtype, + the loss (the reference gets no gradient)
  transient     peak_extra - outputs: everything else at the peak (logits buffers, softmax
                temporaries, allocator slack)
  ru_maxrss_extra  ru_maxrss (the kernel's high-water mark) - rss_before: a check on sampling
The JSON's ratios: chunked time / eager time and chunked transient / eager transient, per dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.chunked_head import default_chunk  # noqa: E402
from kernels.linear_kl_ce import kl_ce_from_logits, linear_kl_ce  # noqa: E402
from kernels.linear_logprob import linear_logprob  # noqa: E402

VARIANTS = ("ce-eager", "ce-chunked", "ce-recompute", "kl-eager", "kl-chunked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
RESULTS = REPO / "benchmarks" / "results"
CPU = torch.device("cpu")


# ------------------------------------------------------------------ child: one measured run


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Max RSS sampled every `period` s by a thread, between start() and stop()."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    def __enter__(self) -> PeakSampler:
        self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def randn_(out: torch.Tensor, g: torch.Generator, std: float, rows: int = 4096) -> torch.Tensor:
    """Fill `out` with N(0, std^2) a block of rows at a time: no full-size fp32 temporary, so
    making the inputs never raises the high-water mark above the step's."""
    for s in range(0, out.shape[0], rows):
        out[s : s + rows] = torch.randn(out[s : s + rows].shape, generator=g).mul_(std)
    return out


def make_inputs(variant: str, n: int, vocab: int, hid: int, dtype, device=CPU) -> dict:
    g = torch.Generator().manual_seed(0)

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=device)

    x = {
        "h": randn_(empty(n, hid), g, 1.0).requires_grad_(),
        "weight": randn_(empty(vocab, hid), g, hid**-0.5).requires_grad_(),
        "labels": torch.randint(0, vocab, (n,), generator=g).to(device),
        "w": torch.full((n,), 1.0 / n, device=device),
    }
    if variant.startswith("kl"):
        x["ref_h"] = randn_(empty(n, hid), g, 1.0)
        x["ref_weight"] = randn_(empty(vocab, hid), g, hid**-0.5)
    return x


def loss_of(variant: str, x: dict, chunk: int | None) -> torch.Tensor:
    h, weight, labels, w = x["h"], x["weight"], x["labels"], x["w"]
    # CPU: the chunked torch path; CUDA: the ops' own pick (Triton where it is importable).
    kw = dict(backend="torch" if h.device.type == "cpu" else None, chunk_size=chunk)
    if variant == "ce-eager":
        z = F.linear(h, weight).float()
        return (w * F.cross_entropy(z, labels, reduction="none")).sum()
    if variant == "ce-chunked":
        return linear_logprob(h, weight, labels, weights=-w, **kw)
    if variant == "ce-recompute":
        return -(w * linear_logprob(h, weight, labels, **kw)).sum()
    if variant == "kl-eager":
        with torch.no_grad():
            r = F.linear(x["ref_h"], x["ref_weight"])
        ce, kl = kl_ce_from_logits(F.linear(h, weight), r, labels)
        return (w * (ce + kl)).sum()
    if variant == "kl-chunked":
        weights = torch.stack([w, w], dim=1)
        args = (h, weight, x["ref_h"], x["ref_weight"], labels)
        return linear_kl_ce(*args, weights=weights, **kw)
    raise ValueError(f"unknown variant {variant!r}")


def child(
    variant: str,
    dtype_name: str,
    n: int,
    vocab: int,
    hid: int,
    repeats: int,
    chunk: int | None,
    device: torch.device = CPU,
) -> dict:
    dtype = DTYPES[dtype_name]
    x = make_inputs(variant, n, vocab, hid, dtype, device)
    gc.collect()
    times, peaks, before = [], [], 0
    loss = None
    cuda = device.type == "cuda"
    for _ in range(repeats):
        x["h"].grad = x["weight"].grad = None
        gc.collect()
        if cuda:  # the allocator's own count: allocated bytes above the inputs
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            loss = loss_of(variant, x, chunk)
            loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - before)
            continue
        before = rss()
        with PeakSampler() as sampler:
            t0 = time.perf_counter()
            loss = loss_of(variant, x, chunk)
            loss.backward()
            times.append(time.perf_counter() - t0)
        peaks.append(sampler.peak - before)
    outputs = sum(t.grad.numel() * t.grad.element_size() for t in (x["h"], x["weight"]))
    peak_extra = max(peaks)
    return {
        "variant": variant,
        "dtype": dtype_name,
        "N": n,
        "V": vocab,
        "H": hid,
        "device": str(device),
        "chunk_rows": None if "eager" in variant else chunk or default_chunk(n, vocab, device),
        "loss": float(loss),
        "time_s": sorted(times)[len(times) // 2],
        "times_s": times,
        "rss_before_mib": before / MIB,
        "peak_extra_mib": peak_extra / MIB,
        "outputs_mib": outputs / MIB,
        "transient_mib": (peak_extra - outputs) / MIB,
        "ru_maxrss_extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
        / MIB,
    }


# ------------------------------------------------------------------ parent: every run


def run_child(args: argparse.Namespace, variant: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--dtypes", dtype]
    cmd += ["--bt", str(args.bt), "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    cmd += ["--repeats", str(args.repeats), "--device", args.device]
    if args.chunk_rows:
        cmd += ["--chunk-rows", str(args.chunk_rows)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {"variant": variant, "dtype": dtype, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(rows: list[dict]) -> dict:
    """chunked / eager time and transient memory, per op and dtype."""
    by = {(r["variant"], r["dtype"]): r for r in rows if "error" not in r}
    out = {}
    for (variant, dtype), r in by.items():
        op, kind = variant.split("-")
        eager = by.get((f"{op}-eager", dtype))
        if kind == "eager" or eager is None:
            continue
        out[f"{variant}/{dtype}"] = {
            "time_vs_eager": r["time_s"] / eager["time_s"],
            "transient_vs_eager": r["transient_mib"] / eager["transient_mib"],
            "peak_extra_vs_eager": r["peak_extra_mib"] / eager["peak_extra_mib"],
            "loss_rel_diff": abs(r["loss"] - eager["loss"]) / max(1e-12, abs(eager["loss"])),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bt", type=int, default=4096, help="rows N = B*T")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1, help="steps per run (median time)")
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (ops' default)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/logits_memory_<dev>.json")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sizes = (args.bt, args.vocab, args.hidden, args.repeats, args.chunk_rows)
        res = child(args.child, args.dtypes, *sizes, torch.device(args.device))
        print(json.dumps(res))
        return

    t0 = time.time()
    rows = []
    for dtype in args.dtypes.split(","):
        for variant in args.variants.split(","):
            row = run_child(args, variant, dtype)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "times_s"}
            print(json.dumps(shown), flush=True)
    result = {
        "benchmark": "logits_memory",
        "date": date.today().isoformat(),
        "command": "benchmarks/bench_logits_memory.py " + " ".join(sys.argv[1:]),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, "
            + (torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU")
        ),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sizes": {"N": args.bt, "V": args.vocab, "H": args.hidden},
        "chunk_rows": args.chunk_rows
        or default_chunk(args.bt, args.vocab, torch.device(args.device)),
        "method": (
            "each (variant, dtype) in a fresh subprocess; "
            + (
                "torch.cuda.max_memory_allocated above memory_allocated after "
                "reset_peak_memory_stats, over one forward+backward (synchronized)"
                if args.device == "cuda"
                else "MALLOC_MMAP_THRESHOLD_=131072; RSS (/proc/self/statm) sampled every 2 ms "
                "by a thread over one forward+backward"
            )
        ),
        "definitions": {
            "rss_before_mib": "RSS with the inputs made, just before the step",
            "peak_extra_mib": "max sampled RSS during the step - rss_before",
            "outputs_mib": "grad of h (N x H) + grad of W (V x H) in the inputs' dtype",
            "transient_mib": "peak_extra - outputs (logits buffers, temporaries, allocator slack)",
            "ru_maxrss_extra_mib": "kernel high-water mark - rss_before (check on sampling)",
            "time_s": "median wall time of the forward+backward over --repeats steps",
            "targets": "chunked: time <= 1.3 x eager, transient <= 0.2 x eager",
        },
        "rows": rows,
        "ratios": ratios(rows),
        "total_wall_s": round(time.time() - t0, 1),
    }
    args.out = args.out or RESULTS / f"logits_memory_{args.device}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
