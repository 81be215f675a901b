"""Bandwidth of the in-place bit-packed mask apply against torch baselines.

    .venv/bin/python benchmarks/bench_mask_apply.py [--device auto|cpu|cuda] [--quick]
        [--sizes 1e8,1e9] [--densities 0.01,0.5] [--reps 20] [--out results.json]

Implementations, timed in the same run on the same buffer:

  ours       `mask_apply_(buf, packed)`: the Triton kernel on CUDA. On CPU the Triton path would
             run in the interpreter, which is a correctness tool, not a performance path, so
             the torch reference (`mask_apply_reference`: unpack + masked_fill_) is timed instead
             and labelled "ours (torch ref)".
  reference  (CUDA only) `mask_apply_reference` on the GPU: unpack to bool, then masked_fill_
  mul_bool   `buf.mul_(mask)` with an unpacked bool mask (1 byte per element)
  mul_u8     `buf.mul_(mask)` with a uint8 0/1 mask (1 byte per element)
  copy_      `dst.copy_(buf)`: read + write of the same buffer, the bandwidth bound

Bytes moved (read + written): ours 2*n*s + n/8, mul_bool / mul_u8 2*n*s + n, copy_ 2*n*s (s =
bytes per element). "of copy_" is GB/s(impl) / GB/s(copy_); the issue's target for ours on a
GPU is >= 0.85.

Sizes: CUDA 1e6, 1e7, 1e8, 1e9 elements, fp32 and bf16 (a size whose buffers do not fit in free
memory is skipped); CPU 1e6, 1e7, fp32. Mask density (fraction of bits set) 0.5 unless
--densities says otherwise. Median of the timed repetitions after warm-up (CUDA: events around
each call). On CUDA every (size, dtype, density) also checks, before timing, that ours leaves the
buffer bit-identical to the reference ("bit_identical_to_reference").
Writes benchmarks/results/mask_apply_<device>.json (or --out) and prints a markdown table.
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

import kernels.mask_apply as ma  # noqa: E402
from kernels.mask_apply import mask_apply_, mask_apply_reference, pack_mask  # noqa: E402

IMPLS = ("ours", "reference", "mul_bool", "mul_u8", "copy_")


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
    # buf, copy dst / check clone, bool and uint8 masks, packed; the fp32 draw of the mask and
    # the reference's unpack temporaries (about 3 bytes per element) come and go.
    need = n * (2 * dtype.itemsize + 2) + n // 8 + n * max(4, 3)
    free, _ = torch.cuda.mem_get_info()
    return need < 0.9 * free


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def bench_one(
    n: int, dtype: torch.dtype, device: str, reps: int, density: float = 0.5
) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    buf = torch.randn(n, generator=g, device=device).to(dtype)
    mask_bool = torch.rand(n, generator=g, device=device) < density
    mask_u8 = mask_bool.to(torch.uint8)
    packed = pack_mask(mask_bool)
    dst = torch.empty_like(buf)
    s = dtype.itemsize
    identical = None
    if device == "cuda":
        ours = ("ours", lambda: mask_apply_(buf, packed, use_triton=True))
        ref = buf.clone()
        mask_apply_reference(ref, packed)
        mask_apply_(buf, packed, use_triton=True)
        identical = bool(torch.equal(_bits(buf), _bits(ref)))
        del ref
        buf.normal_(generator=g)  # fresh values for the timed calls
        extra = [
            ("reference", lambda: mask_apply_reference(buf, packed), 2 * n * s + packed.numel())
        ]
    else:
        ours = ("ours (torch ref)", lambda: mask_apply_reference(buf, packed))
        extra = []
    cases = [
        (*ours, 2 * n * s + packed.numel()),
        *extra,
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
                density=density,
                median_ms=sec * 1e3,
                bytes=nbytes,
                gb_s=nbytes / sec / 1e9,
            )
        )
    copy_gbs = rows[-1]["gb_s"]
    for r in rows:
        r["frac_of_copy"] = r["gb_s"] / copy_gbs
        if identical is not None and r["impl"] == "ours":
            r["bit_identical_to_reference"] = identical
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="smallest size only")
    ap.add_argument("--sizes", help="comma list of element counts, e.g. 1e8,1e9")
    ap.add_argument("--densities", default="0.5", help="comma list of mask densities")
    ap.add_argument("--reps", type=int, help="timed repetitions (default CUDA 20, CPU 10)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/mask_apply_<device>.json)")
    args = ap.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        sizes, dtypes, reps = [10**6, 10**7, 10**8, 10**9], [torch.float32, torch.bfloat16], 20
    else:
        sizes, dtypes, reps = [10**6, 10**7], [torch.float32], 10
    if args.sizes:
        sizes = [int(float(v)) for v in args.sizes.split(",")]
    if args.quick:
        sizes = sizes[:1]
    if args.reps:
        reps = args.reps
    densities = [float(v) for v in args.densities.split(",")]

    t_start = time.time()
    rows, skipped = [], []
    for dtype in dtypes:
        for n in sizes:
            if not _fits(n, dtype, device):
                skipped.append(dict(n=n, dtype=str(dtype), reason="does not fit in free memory"))
                continue
            for density in densities:
                rows.extend(bench_one(n, dtype, device, reps, density))
                if device == "cuda":
                    torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    header = dict(
        benchmark="mask_apply",
        command="benchmarks/bench_mask_apply.py " + " ".join(sys.argv[1:]),
        machine=dict(
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            gpu=gpu or "no GPU",
            device=device,
            torch=torch.__version__,
            triton=getattr(ma.triton, "__version__", None),
            python=platform.python_version(),
            description=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{gpu or 'no GPU'}",
        ),
        date=time.strftime("%Y-%m-%d"),
        timing=f"median of {reps} calls after 2 warm-up calls; "
        + ("CUDA events around each call" if device == "cuda" else "time.perf_counter"),
        densities=densities,
        total_wall_s=round(time.time() - t_start, 1),
    )
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
    default = REPO / "benchmarks" / "results" / f"mask_apply_{device}.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(**header, meta=meta, rows=rows, skipped=skipped)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print("| n | dtype | density | impl | median (ms) | GB/s (read+write) | of copy_ | = ref |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = r.get("bit_identical_to_reference")
        print(
            f"| {r['n']:.3g} | {r['dtype']} | {r['density']} | {r['impl']} | {r['median_ms']:.3f} "
            f"| {r['gb_s']:.1f} | {r['frac_of_copy']:.2f} | {'' if same is None else same} |"
        )
    for s in skipped:
        print(f"skipped n={s['n']:.0e} {s['dtype']}: {s['reason']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
