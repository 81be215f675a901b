"""Bandwidth of the in-place bit-packed mask apply against torch baselines.

    .venv/bin/python benchmarks/bench_mask_apply.py [--device auto|cpu|cuda] [--quick]

Implementations, timed in the same run on the same buffer:

  ours       `mask_apply_(buf, packed)`: the Triton kernel on CUDA. On CPU the Triton path would
             run in the interpreter, which is a correctness tool, not a performance path, so
             the torch reference (`mask_apply_reference`: unpack + masked_fill_) is timed instead
             and labelled "ours (torch ref)".
  mul_bool   `buf.mul_(mask)` with an unpacked bool mask (1 byte per element)
  mul_u8     `buf.mul_(mask)` with a uint8 0/1 mask (1 byte per element)
  copy_      `dst.copy_(buf)`: read + write of the same buffer, the bandwidth bound

Bytes moved (read + written): ours 2*n*s + n/8, mul_bool / mul_u8 2*n*s + n, copy_ 2*n*s (s =
bytes per element). "of copy_" is GB/s(impl) / GB/s(copy_); the issue's target for ours on a
GPU is >= 0.85.

Sizes: CUDA 1e6, 1e7, 1e8, 1e9 elements, fp32 and bf16 (a size whose buffers do not fit in free
memory is skipped); CPU 1e6, 1e7, fp32. Median of the timed repetitions after warm-up.
Writes benchmarks/results/mask_apply_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.mask_apply import mask_apply_, mask_apply_reference, pack_mask  # noqa: E402

IMPLS = ("ours", "mul_bool", "mul_u8", "copy_")


def _timer(device: str, fn, warmup: int, reps: int) -> float:
    """Median seconds of `fn()` (CUDA: events around each call; CPU: perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fits(n: int, dtype: torch.dtype, device: str) -> bool:
    if device != "cuda":
        return True
    need = n * (2 * dtype.itemsize + 2) + n // 8  # buf, copy dst, bool and uint8 masks, packed
    free, _ = torch.cuda.mem_get_info()
    return need < 0.9 * free


def bench_one(n: int, dtype: torch.dtype, device: str, reps: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    buf = torch.randn(n, generator=g, device=device).to(dtype)
    mask_bool = torch.rand(n, generator=g, device=device) < 0.5
    mask_u8 = mask_bool.to(torch.uint8)
    packed = pack_mask(mask_bool)
    dst = torch.empty_like(buf)
    s = dtype.itemsize
    if device == "cuda":
        ours = ("ours", lambda: mask_apply_(buf, packed, use_triton=True))
    else:
        ours = ("ours (torch ref)", lambda: mask_apply_reference(buf, packed))
    cases = [
        (*ours, 2 * n * s + packed.numel()),
        ("mul_bool", lambda: buf.mul_(mask_bool), 2 * n * s + n),
        ("mul_u8", lambda: buf.mul_(mask_u8), 2 * n * s + n),
        ("copy_", lambda: dst.copy_(buf), 2 * n * s),
    ]
    rows = []
    for name, fn, nbytes in cases:
        sec = _timer(device, fn, warmup=2, reps=reps)
        rows.append(
            dict(
                n=n,
                dtype=str(dtype).removeprefix("torch."),
                impl=name,
                median_ms=sec * 1e3,
                bytes=nbytes,
                gb_s=nbytes / sec / 1e9,
            )
        )
    copy_gbs = rows[-1]["gb_s"]
    for r in rows:
        r["frac_of_copy"] = r["gb_s"] / copy_gbs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smallest size only")
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        sizes, dtypes, reps = [10**6, 10**7, 10**8, 10**9], [torch.float32, torch.bfloat16], 20
    else:
        sizes, dtypes, reps = [10**6, 10**7], [torch.float32], 10
    if args.quick:
        sizes = sizes[:1]

    rows, skipped = [], []
    for dtype in dtypes:
        for n in sizes:
            if not _fits(n, dtype, device):
                skipped.append(dict(n=n, dtype=str(dtype), reason="does not fit in free memory"))
                continue
            rows.extend(bench_one(n, dtype, device, reps))
            if device == "cuda":
                torch.cuda.empty_cache()

    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        device=device,
        machine=platform.machine(),
        cpu_threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        torch=torch.__version__,
        reps=reps,
        note=None
        if device == "cuda"
        else "CPU: 'ours' is the torch reference (unpack + masked_fill_); the Triton "
        "interpreter is not a performance path",
    )
    out = REPO / "benchmarks" / "results" / f"mask_apply_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows, skipped=skipped), indent=2) + "\n")

    print("| n | dtype | impl | median (ms) | GB/s (read+write) | of copy_ |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:.0e} | {r['dtype']} | {r['impl']} | {r['median_ms']:.3f} "
            f"| {r['gb_s']:.1f} | {r['frac_of_copy']:.2f} |"
        )
    for s in skipped:
        print(f"skipped n={s['n']:.0e} {s['dtype']}: {s['reason']}")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
