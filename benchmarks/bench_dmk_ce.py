"""Forward+backward time and peak extra memory of alpha*CE + beta*Dual Masked KL, four ways.

    .venv/bin/python benchmarks/bench_dmk_ce.py [--device auto|cpu|cuda] [--quick]
        [--impls eager,compile,liger,ours] [--vocabs 32000,151936] [--ns 4096,8192]
        [--hidden 4096] [--out results.json] [--plot plot.png]

Implementations, all timed in the same run on the same inputs:

  eager    plain torch over full [N, V] logits of both models (`dual_masked_kl_ce_reference`)
  compile  torch.compile of that same function (a compile failure is recorded, not raised)
  liger    Liger-Kernel LigerFusedLinearCrossEntropyLoss + LigerFusedLinearJSD(jsd_beta=0), i.e.
           forward KL(p_ref || q) in Liger's generalised JSD. Liger has no token mask and no
           vocabulary mask: the token mask is emulated by passing -100 as the JSD's shift_labels
           on masked rows, the vocabulary drop ids are NOT applied (so it does slightly different,
           not less, work). Skipped when liger-kernel is not importable.
  ours     `dual_masked_kl_ce(..., use_triton=True)`, CUDA only (the Triton CPU interpreter is a
           correctness tool, not a performance path).

Sizes: CUDA V in {32000, 128256, 151936}, N in {1024, 4096, 8192}, H=4096, bf16; CPU (torch paths
only) V in {2048, 8192}, N in {256, 1024}, H=256, fp32. --quick keeps the smallest ones;
--vocabs/--ns/--hidden override them, --impls picks a subset (the others are not run at all).

Timing: CUDA, CUDA events around each forward+backward step (median over the repeats); CPU,
time.perf_counter. On CUDA the large inputs are drawn on the GPU (a CUDA generator, seed 0).

Peak extra memory: CUDA, torch.cuda.max_memory_allocated() after reset_peak_memory_stats() minus
the memory allocated before the step (inputs, weights); CPU, torch.profiler(profile_memory=True)
around one step, the maximum of the running sum of the CPU allocator's allocation and free
events in time order (frees of blocks allocated before the profiler started are ignored). Both
figures include the gradients of h and weight the step leaves behind.

Writes benchmarks/results/dmk_ce_<device>.json and benchmarks/plots/dmk_ce_<device>.png (or --out
and --plot) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from kernels.dual_masked_kl_ce import (  # noqa: E402
    dual_masked_kl_ce,
    dual_masked_kl_ce_reference,
)

IMPLS = ("eager", "compile", "liger", "ours")
ALPHA, BETA = 1.0, 1.0
MIB = 2**20
LIGER_NOTE = (
    "Liger has no token/vocabulary masks: token mask emulated via JSD shift_labels=-100, "
    "vocabulary drop ids not applied; jsd_beta=0 is forward KL(p_ref || q) in Liger's JSD"
)
OURS_CPU_SKIP = (
    "skipped: Triton kernels compile only on a GPU (the CPU interpreter is not a performance path)"
)
CPU_MEMORY_METHOD = (
    "torch.profiler(profile_memory=True) around one forward+backward; peak of the running sum of "
    "the CPU allocator's allocation/free events in time order (frees of blocks allocated before "
    "the profiler started ignored); inputs excluded, the left-behind grads of h and weight included"
)
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
    "torch.cuda.memory_allocated() before the step (inputs excluded, grads of h and weight included)"
)


def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "description": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}",
    }


def make_inputs(n: int, vocab: int, hid: int, dtype, device, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    # CPU: one generator for everything (as the recorded CPU results). CUDA: the large tensors are
    # drawn on the GPU (drawing 2 x 151936 x 4096 normals on the host takes tens of seconds).
    dev = torch.device(device)
    gd = g if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(seed)
    scale = hid**-0.5

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gd, device=gd.device) * s).to(device=dev, dtype=dtype)

    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100
    token_mask = torch.rand(n, generator=g) < 0.3
    n_drop = int(torch.randint(2, 5, (1,), generator=g))
    drop_ids = torch.randperm(vocab, generator=g)[:n_drop]
    return {
        "h": rnd(n, hid).requires_grad_(),
        "weight": rnd(vocab, hid, s=scale).requires_grad_(),
        "ref_h": rnd(n, hid),
        "ref_weight": rnd(vocab, hid, s=scale),
        "labels": labels.to(device),
        "token_mask": token_mask.to(device),
        "drop_ids": drop_ids.to(device),
    }


def _args(x: dict) -> tuple:
    return (x["h"], x["weight"], x["ref_h"], x["ref_weight"], x["labels"], x["token_mask"])


def eager_loss(x: dict) -> torch.Tensor:
    return dual_masked_kl_ce_reference(*_args(x), x["drop_ids"], alpha=ALPHA, beta=BETA)


_COMPILED = None


def compile_loss(x: dict) -> torch.Tensor:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(dual_masked_kl_ce_reference, dynamic=False)
    return _COMPILED(*_args(x), x["drop_ids"], alpha=ALPHA, beta=BETA)


_LIGER = None


def liger_loss(x: dict) -> torch.Tensor:
    global _LIGER
    if _LIGER is None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        _LIGER = (
            LigerFusedLinearCrossEntropyLoss(ignore_index=-100),
            LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=1.0),
        )
    ce_fn, jsd_fn = _LIGER
    kl_labels = torch.where(x["token_mask"], torch.full_like(x["labels"], -100), x["labels"])
    ce = ce_fn(x["weight"], x["h"], x["labels"])
    kl = jsd_fn(x["h"], x["weight"], x["ref_h"], x["ref_weight"], kl_labels)
    return ALPHA * ce + BETA * kl


def ours_loss(x: dict) -> torch.Tensor:
    return dual_masked_kl_ce(*_args(x), x["drop_ids"], alpha=ALPHA, beta=BETA, use_triton=True)


LOSSES = {"eager": eager_loss, "compile": compile_loss, "liger": liger_loss, "ours": ours_loss}


def skip_reason(impl: str, device: torch.device) -> str | None:
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "skipped: liger-kernel not installed"
        if device.type != "cuda":
            return "skipped: Liger-Kernel's Triton kernels need a GPU"
    if impl == "ours" and device.type != "cuda":
        return OURS_CPU_SKIP
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(fn, x: dict) -> torch.Tensor:
    x["h"].grad = None
    x["weight"].grad = None
    loss = fn(x)
    loss.backward()
    return loss.detach()


def cpu_peak_bytes(fn, x: dict) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    x["h"].grad = None
    x["weight"].grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(fn, x)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
        stack.extend(e.children)
    events.sort(key=lambda t: t[0])
    live: dict[int, int] = {}
    cur = peak = 0
    for _, size, ptr in events:
        if size > 0:
            live[ptr] = size
            cur += size
        elif ptr in live:  # a free of a block allocated inside the window
            cur -= live.pop(ptr)
        peak = max(peak, cur)
    return peak


def cuda_peak_bytes(fn, x: dict) -> int:
    x["h"].grad = None
    x["weight"].grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_impl(impl: str, x: dict, device, warmup: int, repeats: int) -> dict:
    fn = LOSSES[impl]
    row: dict = {"impl": impl}
    try:
        t0 = time.perf_counter()
        loss = step(fn, x)
        sync(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)  # includes any compile
        row["loss"] = float(loss)
        row["_grad_h"] = x["h"].grad.detach().float().clone()
        for _ in range(max(0, warmup - 1)):
            step(fn, x)
        sync(device)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                step(fn, x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(fn, x)
                times.append(time.perf_counter() - t0)
        row["median_ms"] = round(1e3 * statistics.median(times), 3)
        row["min_ms"] = round(1e3 * min(times), 3)
        row["repeats"] = repeats
        peak = cuda_peak_bytes(fn, x) if device.type == "cuda" else cpu_peak_bytes(fn, x)
        row["peak_extra_mib"] = round(peak / MIB, 2)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        row.pop("_grad_h", None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        x["h"].grad = None
        x["weight"].grad = None
    return row


def ratio(a, b):
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def run_case(n, vocab, hid, dtype, device, warmup, repeats, impls=IMPLS) -> list[dict]:
    x = make_inputs(n, vocab, hid, dtype, device)
    logits_mib = 2 * n * vocab * 4 / MIB
    rows = []
    for impl in impls:
        reason = skip_reason(impl, device)
        row = (
            {"impl": impl, "status": reason}
            if reason
            else run_impl(impl, x, device, warmup, repeats)
        )
        row.update({"V": vocab, "N": n, "H": hid, "dtype": str(dtype).replace("torch.", "")})
        row["two_fp32_logits_mib"] = round(logits_mib, 2)
        if impl == "liger":
            row["note"] = LIGER_NOTE
        rows.append(row)
    by = {r["impl"]: r for r in rows}
    eager = by.get("eager", {"status": "not run"})
    for row in rows:
        if row["status"] != "ok" or eager["status"] != "ok":
            continue
        row["time_vs_eager"] = ratio(row.get("median_ms"), eager.get("median_ms"))
        row["mem_vs_eager"] = ratio(row.get("peak_extra_mib"), eager.get("peak_extra_mib"))
        row["loss_abs_diff_vs_eager"] = abs(row["loss"] - eager["loss"])
        g, ge = row["_grad_h"], eager["_grad_h"]
        row["grad_h_max_rel_diff_vs_eager"] = float((g - ge).abs().max() / ge.abs().max())
    ours, liger = by.get("ours"), by.get("liger")
    if ours and liger and ours["status"] == "ok" and liger["status"] == "ok":
        ours["time_vs_liger"] = ratio(ours["median_ms"], liger["median_ms"])
        ours["mem_vs_liger"] = ratio(ours["peak_extra_mib"], liger["peak_extra_mib"])
    for row in rows:
        row.pop("_grad_h", None)
    return rows


def fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(rows: list[dict]) -> str:
    lines = [
        "| V | N | impl | median fwd+bwd (ms) | peak extra (MiB) | 2 fp32 logits (MiB) "
        "| time / eager | mem / eager | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['V']} | {r['N']} | {r['impl']} | {fmt(r.get('median_ms'), 1)} "
            f"| {fmt(r.get('peak_extra_mib'), 1)} | {fmt(r['two_fp32_logits_mib'], 1)} "
            f"| {fmt(r.get('time_vs_eager'))} | {fmt(r.get('mem_vs_eager'))} "
            f"| {'ok' if ok else r['status']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"eager": "tab:blue", "compile": "tab:orange", "liger": "tab:green", "ours": "tab:red"}
    vocabs = sorted({r["V"] for r in rows})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in (
        (axes[0], "median_ms", "median forward+backward time (ms)"),
        (axes[1], "peak_extra_mib", "peak extra memory (MiB)"),
    ):
        for impl in IMPLS:
            for i, vocab in enumerate(vocabs):
                pts = sorted(
                    (r["N"], r[key])
                    for r in rows
                    if r["impl"] == impl and r["V"] == vocab and r["status"] == "ok"
                )
                if not pts:
                    continue
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    color=colors[impl],
                    linestyle=styles[i % len(styles)],
                    marker=markers[i % len(markers)],
                    label=f"{impl}, V={vocab}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (rows)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    skipped = sorted({r["impl"] for r in rows if r["status"] != "ok"})
    sub = f" (not measured: {', '.join(skipped)})" if skipped else ""
    fig.suptitle(title + sub, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--quick", action="store_true", help="smallest sizes and fewer repeats")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list, subset of " + str(IMPLS))
    ap.add_argument("--vocabs", help="comma list of V (overrides the device default)")
    ap.add_argument("--ns", help="comma list of N (overrides the device default)")
    ap.add_argument("--hidden", type=int, help="H (overrides the device default)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/dmk_ce_<device>.json)")
    ap.add_argument("--plot", help="PNG path (default benchmarks/plots/dmk_ce_<device>.png)")
    args = ap.parse_args()
    impls = tuple(i for i in args.impls.split(",") if i)
    if not impls or any(i not in IMPLS for i in impls):
        sys.exit(f"--impls must be a comma list of {IMPLS}, got {args.impls!r}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")

    if device.type == "cuda":
        vocabs, ns, hid, dtype = [32000, 128256, 151936], [1024, 4096, 8192], 4096, torch.bfloat16
        warmup, repeats = 3, 10
        if args.quick:
            vocabs, ns, repeats = [32000], [1024, 4096], 5
    else:
        vocabs, ns, hid, dtype = [2048, 8192], [256, 1024], 256, torch.float32
        warmup, repeats = 2, 5
        if args.quick:
            vocabs, ns, repeats = [2048], [256], 3
    if args.vocabs:
        vocabs = [int(v) for v in args.vocabs.split(",")]
    if args.ns:
        ns = [int(v) for v in args.ns.split(",")]
    if args.hidden:
        hid = args.hidden

    info = machine(device)
    print(f"# dual masked KL + CE on {info['description']}, torch {info['torch']}", flush=True)
    t_start = time.time()
    rows = []
    for vocab in vocabs:
        for n in ns:
            case = run_case(n, vocab, hid, dtype, device, warmup, repeats, impls)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for r in case:
                print(
                    f"V={vocab} N={n} {r['impl']:8s} {r['status'][:60]:60s} "
                    f"{fmt(r.get('median_ms'), 1)} ms {fmt(r.get('peak_extra_mib'), 1)} MiB",
                    flush=True,
                )
            rows.extend(case)

    errors = {r["impl"]: r["status"] for r in rows if r["status"].startswith("error")}
    result = {
        "benchmark": "dual_masked_kl_ce",
        "date": time.strftime("%Y-%m-%d"),
        "command": "benchmarks/bench_dmk_ce.py " + " ".join(sys.argv[1:]),
        "machine": info,
        "quick": args.quick,
        "alpha": ALPHA,
        "beta": BETA,
        "inputs": "random h, weight (V x H, std H^-0.5), ref_h, ref_weight; labels ~10% -100; "
        "token_mask ~30% True; 2-4 drop_ids; seed 0",
        "timing": f"median of {repeats} forward+backward steps after {warmup} warm-up steps "
        "(the first warm-up includes torch.compile / Triton JIT); grads reset to None before each "
        "step; "
        + ("CUDA events around each step" if device.type == "cuda" else "time.perf_counter"),
        "impls": list(impls),
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "liger_note": LIGER_NOTE,
        "errors": errors,
        "total_wall_s": round(time.time() - t_start, 1),
        "rows": rows,
    }
    dev = device.type
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"dmk_ce_{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = Path(args.plot) if args.plot else REPO / "benchmarks" / "plots" / f"dmk_ce_{dev}.png"
    title = f"alpha*CE + beta*DMK fwd+bwd, {info['description']}, H={hid}, {rows[0]['dtype']}"
    plot(rows, png, title)
    print()
    print(markdown(rows))
    print(f"\nmemory: {result['memory_method']}")
    print(f"liger: {LIGER_NOTE}")
    print(f"\n{out}\n{png}\ntotal {result['total_wall_s']} s")


if __name__ == "__main__":
    main()
