"""GPU correctness of both Triton kernels, compiled, against their torch references.

    python3 benchmarks/gpu_check.py [--out gpu_check.json]            # CUDA, compiled Triton
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu_check.py --device cpu --quick   # dry run

Dual masked KL + CE (`kernels/dual_masked_kl_ce.py`): for each case and dtype (fp32, bf16) the
fused op (`use_triton=True`) and the torch reference (`dual_masked_kl_ce_reference`, same dtype,
same inputs) both run forward + backward (alpha 0.9, beta 0.75, the loss scaled by 1.7 before
backward), and a float64 re-statement of the loss (chunked over rows, on the same bf16/fp32
inputs upcast) is the ground truth. Recorded per output (loss, d/dh, d/dW, d/db): max |diff|,
max |diff| / max |truth| and ||diff|| / ||truth|| of the fused op and of the reference against
float64, max |fused - reference|, whether the fused op passes the test suite's elementwise
tolerances against the reference (tests/test_kernel_dmk_ce.py TOL; informational: where bf16
logits are far from exact, both ops are, and elementwise they can differ by more), and whether
two fused runs are bit-identical (a moving error would be a race). A case passes when every
output is finite and within NORM_TOL of float64 (or at most twice the reference's own error),
the two fused runs are bit-identical and the Triton backend ran.

Mask apply (`kernels/mask_apply.py`): the kernel against `mask_apply_reference` over lengths,
dtypes and mask densities (NaN and inf planted in the buffer), bit-identical or not, including
one bf16 buffer of 2**31 + 1029 elements (int64 indexing).

Inputs are random (fresh per case, on the device), logits of std `logit_std`. Writes one JSON
(--out) and prints a table.

    python3 benchmarks/gpu_check.py --profile-dmk dmk_profile.json

instead times, at bench_dmk_ce.py's inputs (bf16, H=4096, N=8192, V=32000 and 151936), one
forward+backward of eager and of the fused op as shipped and with two what-if settings (1024-row
chunks; TF32 allowed for its fp32 grad_weight matmul), and splits one fused step's GPU time by
kernel with torch.profiler: where the fused op's time goes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kernels.dual_masked_kl_ce as dmk  # noqa: E402
import kernels.mask_apply as ma  # noqa: E402
from kernels.chunked_head import default_chunk  # noqa: E402

ALPHA, BETA, GRAD_SCALE = 0.9, 0.75, 1.7
# The test suite's elementwise tolerances, fused vs the reference in the same dtype.
TEST_TOL = {torch.float32: dict(atol=1e-5, rtol=5e-4), torch.bfloat16: dict(atol=5e-3, rtol=5e-2)}
# Norm-relative error against float64: fp32 arithmetic lands far under 1e-4; bf16 logits and
# bf16 gradients (2**-8 relative rounding) near 1e-3..1e-2. A case also passes when the fused
# error is at most twice the torch reference's own error in the same dtype (bf16 logits of a
# very peaked softmax are inexact for both).
NORM_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}

# name, N, V, H, ref H, bias, chunk_size, reduction, logit std
DMK_CASES = [
    ("llama V=32000 H=4096", 257, 32000, 4096, 4096, False, None, "mean", 3.0),
    ("qwen2 V=151936 H=3584 +bias", 1000, 151936, 3584, 3584, True, None, "mean", 3.0),
    ("V=32001 odd, ref H 3584, chunk 100, sum", 513, 32001, 4096, 3584, False, 100, "sum", 3.0),
    ("V=151936 H=4096 N=4096", 4096, 151936, 4096, 4096, False, None, "mean", 3.0),
    ("peaked: logit std 30, chunk 64, +bias", 333, 32000, 4096, 4096, True, 64, "mean", 30.0),
    ("small V=1000 (1 tile), chunk 7, +bias", 77, 1000, 64, 96, True, 7, "mean", 3.0),
]
QUICK_DMK_CASES = [
    ("quick V=301", 13, 301, 32, 24, True, 5, "mean", 3.0),
    ("quick V=1000 sum", 9, 1000, 16, 16, False, None, "sum", 30.0),
]
MASK_LENGTHS = [1, 7, 8, 9, 4095, 4096, 4097, 10**6 + 3, 123_456_789]
QUICK_MASK_LENGTHS = [1, 7, 9, 4097, 10_003]
MASK_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DENSITIES = [0.01, 0.5, 0.99]
BIG_MASK_N = 2**31 + 1029  # past int32 indexing


def _f(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


# --------------------------------------------------------------------------------------------
# Dual masked KL + CE
# --------------------------------------------------------------------------------------------


def dmk_inputs(n, v, hid, rhid, bias, std, dtype, device, seed) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)

    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < 0.1] = dmk.IGNORE_INDEX
    return dict(
        h=rnd(n, hid),
        weight=rnd(v, hid, s=std / math.sqrt(hid)),
        bias=rnd(v, s=0.5) if bias else None,
        ref_h=rnd(n, rhid),
        ref_weight=rnd(v, rhid, s=std / math.sqrt(rhid)),
        ref_bias=rnd(v, s=0.5) if bias else None,
        labels=labels,
        token_mask=torch.rand(n, generator=g, device=device) < 0.3,
        drop_ids=torch.randint(0, v, (4,), generator=g, device=device),
    )


def run_op(inp: dict, reduction: str, fused: bool, chunk) -> tuple[torch.Tensor, dict]:
    leaf = {k: None if inp[k] is None else inp[k].detach().clone().requires_grad_() for k in
            ("h", "weight", "bias")}  # fmt: skip
    args = (leaf["h"], leaf["weight"], inp["ref_h"], inp["ref_weight"], inp["labels"])
    args += (inp["token_mask"], inp["drop_ids"])
    kw = dict(alpha=ALPHA, beta=BETA, bias=leaf["bias"], ref_bias=inp["ref_bias"])
    if fused:
        loss = dmk.dual_masked_kl_ce(
            *args, **kw, reduction=reduction, chunk_size=chunk, use_triton=True
        )
    else:
        loss = dmk.dual_masked_kl_ce_reference(*args, **kw, reduction=reduction)
    (loss * GRAD_SCALE).backward()
    grads = {k: t.grad for k, t in leaf.items() if t is not None}
    return loss.detach(), grads


def run_fp64(inp: dict, reduction: str) -> tuple[torch.Tensor, dict]:
    """The loss restated in float64 from the (already rounded) inputs, chunked over rows."""
    h = inp["h"].double()
    w = inp["weight"].double().requires_grad_()
    b = None if inp["bias"] is None else inp["bias"].double().requires_grad_()
    rh, rw = inp["ref_h"].double(), inp["ref_weight"].double()
    rb = None if inp["ref_bias"] is None else inp["ref_bias"].double()
    labels, tmask = inp["labels"], inp["token_mask"]
    n, v = h.shape[0], w.shape[0]
    valid = labels != dmk.IGNORE_INDEX
    kl_rows = valid & ~tmask
    if reduction == "mean":
        sa = ALPHA / valid.sum().clamp(min=1).double()
        sb = BETA / kl_rows.sum().clamp(min=1).double()
    else:
        sa, sb = ALPHA, BETA
    drop = torch.zeros(v, dtype=torch.bool, device=h.device)
    drop[inp["drop_ids"]] = True
    grad_h = torch.empty_like(h)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    rows = max(1, 2**27 // v)  # ~1 GiB per float64 [rows, V]
    for s in range(0, n, rows):
        e = min(n, s + rows)
        hc = h[s:e].clone().requires_grad_()
        log_q = F.linear(hc, w, b).log_softmax(-1)
        with torch.no_grad():
            log_p = F.linear(rh[s:e], rw, rb).log_softmax(-1)
            p = log_p.exp()
        ce = -log_q.gather(1, labels[s:e].clamp(min=0)[:, None]).squeeze(1)
        ce = torch.where(valid[s:e], ce, torch.zeros_like(ce))
        kl = (p * (log_p - log_q)).masked_fill(drop[None, :], 0.0).sum(-1)
        kl = torch.where(kl_rows[s:e], kl, torch.zeros_like(kl))
        part = sa * ce.sum() + sb * kl.sum()
        (part * GRAD_SCALE).backward()
        grad_h[s:e] = hc.grad
        total += part.detach()
        del log_q, log_p, p, ce, kl, part
    grads = {"h": grad_h, "weight": w.grad}
    if b is not None:
        grads["bias"] = b.grad
    return total, grads


def errors(got: torch.Tensor, truth: torch.Tensor) -> dict:
    g, t = got.double(), truth.double()
    d = (g - t).abs()
    t_max, t_norm, d_norm = _f(t.abs().max()), _f(t.norm()), _f(d.norm())
    max_abs = _f(d.max())
    return dict(
        max_abs=max_abs,
        max_rel=max_abs / t_max if t_max > 0 else (0.0 if max_abs == 0 else math.inf),
        norm_rel=d_norm / t_norm if t_norm > 0 else (0.0 if d_norm == 0 else math.inf),
        finite=bool(torch.isfinite(g).all()),
    )


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(view), b.contiguous().view(view)))


def dmk_case(case, dtype, device, seed) -> dict:
    name, n, v, hid, rhid, bias, chunk, reduction, std = case
    inp = dmk_inputs(n, v, hid, rhid, bias, std, dtype, device, seed)
    t0 = time.perf_counter()
    f_loss, f_grads = run_op(inp, reduction, True, chunk)
    f2_loss, f2_grads = run_op(inp, reduction, True, chunk)
    r_loss, r_grads = run_op(inp, reduction, False, chunk)
    t_loss, t_grads = run_fp64(inp, reduction)
    if device.type == "cuda":
        torch.cuda.synchronize()
    outs = {"loss": (f_loss, r_loss, t_loss)}
    for k in f_grads:
        outs["grad_" + k] = (f_grads[k], r_grads[k], t_grads[k])
    row = dict(
        case=name, N=n, V=v, H=hid, ref_H=rhid, bias=bias, chunk=chunk, reduction=reduction,
        logit_std=std, dtype=str(dtype).removeprefix("torch."),
        backend=dmk.fused_backend(inp["h"]),
    )  # fmt: skip
    ok = True
    repeat_same = bitwise_equal(f_loss, f2_loss) and all(
        bitwise_equal(f_grads[k], f2_grads[k]) for k in f_grads
    )
    tol = NORM_TOL[dtype]
    for k, (fo, ro, to) in outs.items():
        fe, re_ = errors(fo, to), errors(ro, to)
        try:
            torch.testing.assert_close(fo.float(), ro.float(), **TEST_TOL[dtype])
            test_tol_ok, msg = True, None
        except AssertionError as exc:
            test_tol_ok, msg = False, str(exc).strip().splitlines()[0][:200]
        fp64_ok = fe["finite"] and fe["norm_rel"] <= max(tol, 2 * re_["norm_rel"])
        ok &= fp64_ok
        row["test_tol_ok_all"] = row.get("test_tol_ok_all", True) and test_tol_ok
        row[k] = dict(
            fused_vs_fp64=fe,
            ref_vs_fp64=re_,
            fused_vs_ref_max_abs=_f((fo.double() - ro.double()).abs().max()),
            test_tol_ok=test_tol_ok,
            test_tol_msg=msg,
            fp64_ok=fp64_ok,
            dtype=str(fo.dtype).removeprefix("torch."),
        )
    row["value_fused"] = _f(f_loss)
    row["value_fp64"] = _f(t_loss)
    row["fused_repeat_bit_identical"] = repeat_same
    row["pass"] = bool(ok and repeat_same and row["backend"] == "triton")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    del inp, f_grads, f2_grads, r_grads, t_grads, outs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------
# Mask apply
# --------------------------------------------------------------------------------------------


def mask_case(n, dtype, density, device, seed) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    buf = torch.randn(n, generator=g, device=device).to(dtype)
    if n > 16:  # plant NaN/inf: masked-out ones must become +0.0, kept ones stay
        buf[::97] = float("nan")
        buf[5::101] = float("inf")
        buf[7::103] = -float("inf")
        buf[11::107] = -0.0
    mask = torch.rand(n, generator=g, device=device) < density
    packed = ma.pack_mask(mask)
    del mask
    ref = buf.clone()
    ma.mask_apply_reference(ref, packed)
    ptr = buf.data_ptr()
    out = ma.mask_apply_(buf, packed, use_triton=True)
    same = bitwise_equal(buf, ref)
    row = dict(
        n=n,
        dtype=str(dtype).removeprefix("torch."),
        density=density,
        backend=ma.mask_backend(buf),
        in_place=out is buf and buf.data_ptr() == ptr,
        bit_identical=same,
    )
    if not same:
        view = {4: torch.int32, 2: torch.int16}[buf.element_size()]
        row["mismatches"] = int((buf.view(view) != ref.view(view)).sum())
    row["pass"] = bool(same and row["in_place"] and row["backend"] == "triton")
    del buf, ref, packed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    info = dict(
        processor=platform.processor() or platform.machine(),
        device=str(device),
        torch=torch.__version__,
        triton=getattr(dmk.triton, "__version__", None),
        python=platform.python_version(),
        interpreter=dmk.interpreter_ready(),
    )
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def _median_ms(fn, device, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def _kind(name: str) -> str:
    low = name.lower()
    if "dmk_ce_row_kernel" in low:
        return "triton row kernel"
    if any(t in low for t in ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "cublas")):
        return "matmul"
    return "other (casts, copies, reductions, elementwise)"


def profile_dmk(out: Path, device: torch.device, quick: bool) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_dmk_ce as bench
    from torch.profiler import ProfilerActivity, profile

    hid, dtype = (4096, torch.bfloat16) if not quick else (32, torch.float32)
    sizes = [(32000, 8192), (151936, 8192)] if not quick else [(300, 17)]
    result = dict(
        benchmark="dmk_profile",
        command="benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        machine=machine(device),
        date=time.strftime("%Y-%m-%d"),
        timing="median of 5 forward+backward steps after 2 warm-ups, CUDA events",
        rows=[],
    )
    for vocab, n in sizes:
        x = bench.make_inputs(n, vocab, hid, dtype, device)

        def ours(chunk=None, x=x):
            return bench.step(
                lambda y: dmk.dual_masked_kl_ce(
                    *bench._args(y), y["drop_ids"], chunk_size=chunk, use_triton=True
                ),
                x,
            )

        row = dict(V=vocab, N=n, H=hid, dtype=str(dtype).removeprefix("torch."))
        row["default_chunk_rows"] = default_chunk(n, vocab, device)
        row["eager_ms"] = _median_ms(lambda x=x: bench.step(bench.eager_loss, x), device)
        row["ours_ms"] = _median_ms(ours, device)
        chunk1024 = min(n, 1024)
        row["ours_chunk1024_ms"] = _median_ms(lambda c=chunk1024: ours(c), device)
        if device.type == "cuda":
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                row["ours_tf32_ms"] = _median_ms(ours, device)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            ours()
            if device.type == "cuda":
                torch.cuda.synchronize()
        evts = list(prof.key_averages())
        if device.type == "cuda":  # GPU kernels only (CPU ops also carry their kernels' time)
            evts = [e for e in evts if "CUDA" in str(getattr(e, "device_type", ""))]
        kernels = []
        for e in evts:
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = getattr(e, "cuda_time_total", 0)
            if t > 0:
                kernels.append(dict(name=e.key[:120], calls=e.count, ms=t / 1e3))
        for key in ("device_time_total", "cuda_time_total", "cpu_time_total"):
            try:
                row["profiler_table"] = prof.key_averages().table(sort_by=key, row_limit=15)
                break
            except Exception:  # noqa: BLE001 - the sort key's name differs across versions
                continue
        kernels.sort(key=lambda k: -k["ms"])
        by_kind: dict[str, float] = {}
        for k in kernels:
            by_kind[_kind(k["name"])] = by_kind.get(_kind(k["name"]), 0.0) + k["ms"]
        row["profile_one_step_ms_by_kind"] = {k: round(v, 2) for k, v in by_kind.items()}
        row["profile_top_kernels"] = kernels[:12]
        result["rows"].append(row)
        print(
            f"V={vocab} N={n}: eager {row['eager_ms']:.1f} ms, ours {row['ours_ms']:.1f} ms "
            f"(chunk {row['default_chunk_rows']} rows), ours chunk 1024 "
            f"{row['ours_chunk1024_ms']:.1f} ms, ours tf32 {row.get('ours_tf32_ms', math.nan):.1f}"
            f" ms; one fused step by kind: {row['profile_one_step_ms_by_kind']}",
            flush=True,
        )
        for k in kernels[:8]:
            print(f"    {k['ms']:9.2f} ms {k['calls']:5d}x {k['name']}", flush=True)
        if not kernels:
            print(row.get("profiler_table", "no profiler table"), flush=True)
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU dry run)")
    ap.add_argument("--skip-big-mask", action="store_true", help="no 2**31-element buffer")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--profile-dmk", metavar="JSON", help="time/profile the fused op instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    if device.type == "cpu" and not dmk.interpreter_ready():
        sys.exit("on CPU, run with TRITON_INTERPRET=1 (set before Python starts)")
    if args.profile_dmk:
        profile_dmk(Path(args.profile_dmk), device, args.quick)
        return
    cases = QUICK_DMK_CASES if args.quick else DMK_CASES
    lengths = QUICK_MASK_LENGTHS if args.quick else MASK_LENGTHS
    big = not (args.quick or args.skip_big_mask)
    t_start = time.time()
    result = dict(
        benchmark="gpu_check",
        command="benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        machine=machine(device),
        date=time.strftime("%Y-%m-%d"),
        alpha=ALPHA,
        beta=BETA,
        grad_scale=GRAD_SCALE,
        test_tol=TEST_TOL_STR,
        norm_tol={"float32": NORM_TOL[torch.float32], "bfloat16": NORM_TOL[torch.bfloat16]},
        dmk=[],
        mask=[],
        errors=[],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["total_wall_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")

    for i, case in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                row = dmk_case(case, dtype, device, seed=100 + i)
            except Exception as exc:  # noqa: BLE001 - record, go on with the other cases
                row = dict(case=case[0], dtype=str(dtype).removeprefix("torch."))
                row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                row["pass"] = False
                result["errors"].append(row["error"])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["dmk"].append(row)
            print(dmk_line(row), flush=True)
            save()

    mask_runs = [(n, dt, d) for n in lengths for dt in MASK_DTYPES for d in DENSITIES]
    if big:
        mask_runs.append((BIG_MASK_N, torch.bfloat16, 0.5))
    for j, (n, dt, d) in enumerate(mask_runs):
        try:
            row = mask_case(n, dt, d, device, seed=1000 + j)
        except Exception as exc:  # noqa: BLE001
            row = dict(n=n, dtype=str(dt).removeprefix("torch."), density=d)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            row["pass"] = False
            result["errors"].append(row["error"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["mask"].append(row)
        if not row["pass"] or n >= 10**6:
            print(mask_line(row), flush=True)
    result["dmk_all_pass"] = all(r["pass"] for r in result["dmk"])
    result["mask_all_pass"] = all(r["pass"] for r in result["mask"])
    save()
    print()
    print(f"mask apply: {sum(r['pass'] for r in result['mask'])}/{len(result['mask'])} pass")
    print(f"dmk: {sum(r['pass'] for r in result['dmk'])}/{len(result['dmk'])} pass")
    print(f"wrote {out} in {result['total_wall_s']} s")


TEST_TOL_STR = {"float32": TEST_TOL[torch.float32], "bfloat16": TEST_TOL[torch.bfloat16]}


def dmk_line(r: dict) -> str:
    if "error" in r:
        return f"DMK {r['case']:42s} {r['dtype']:9s} ERROR {r['error']}"
    parts = []
    for k in ("loss", "grad_h", "grad_weight", "grad_bias"):
        if k in r:
            parts.append(
                f"{k} {r[k]['fused_vs_fp64']['norm_rel']:.1e}/{r[k]['ref_vs_fp64']['norm_rel']:.1e}"
            )
    return (
        f"DMK {r['case']:42s} {r['dtype']:9s} {'PASS' if r['pass'] else 'FAIL'} "
        f"fused/ref norm-rel vs fp64: {', '.join(parts)}; repeat bit-identical "
        f"{r['fused_repeat_bit_identical']}; test tol {r['test_tol_ok_all']}; {r['seconds']} s"
    )


def mask_line(r: dict) -> str:
    if "error" in r:
        return f"MASK n={r['n']} {r['dtype']} d={r['density']} ERROR {r['error']}"
    return (
        f"MASK n={r['n']} {r['dtype']} d={r['density']} {'PASS' if r['pass'] else 'FAIL'} "
        f"bit-identical {r['bit_identical']} in-place {r['in_place']}"
    )


if __name__ == "__main__":
    main()
