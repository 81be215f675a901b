"""Max errors of the fused DMK+CE op against its torch reference, over a sweep of cases.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/dmk_ce_errors.py      # CPU: Triton interpreter
    .venv/bin/python benchmarks/dmk_ce_errors.py                         # CUDA: compiled kernel

For each dtype, the largest |fused - reference| of the loss, d loss/d h and d loss/d W over
odd and even N and V, several vocabulary tiles and chunks, with and without bias, every token
masked, none masked, no dropped ids and all labels ignored. The reference runs in the same dtype
on the same inputs (its log-softmax is fp32, like the fused path's). Writes
benchmarks/results/dmk_ce_errors_<device>.json and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import dual_masked_kl_ce as op  # noqa: E402  (after the path setup)

# (N, V, H, chunk, block_v, case)
CASES = [
    (37, 301, 48, 8, 64, "mixed"),
    (64, 1000, 64, 16, 256, "mixed"),
    (33, 517, 32, 33, 4096, "mixed"),
    (16, 129, 16, 5, 32, "all_masked"),
    (16, 129, 16, 5, 32, "none_masked"),
    (16, 129, 16, 5, 32, "empty_drop"),
    (16, 129, 16, 5, 32, "all_ignored"),
]


def _inputs(n, v, hid, case, dtype, device, bias, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    h, w = rnd(n, hid), rnd(v, hid, scale=hid**-0.5)
    rh, rw = rnd(n, hid), rnd(v, hid, scale=hid**-0.5)
    b = rnd(v, scale=0.1) if bias else None
    rb = rnd(v, scale=0.1) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = op.IGNORE_INDEX
    mask = torch.rand(n, generator=g) < 0.3
    drop = torch.randperm(v, generator=g)[:4]
    if case == "all_masked":
        mask[:] = True
    elif case == "none_masked":
        mask[:] = False
    elif case == "empty_drop":
        drop = drop[:0]
    elif case == "all_ignored":
        labels[:] = op.IGNORE_INDEX
    return h, w, b, rh, rw, rb, labels.to(device), mask.to(device), drop.to(device)


def _run(fn, h, w, b, rh, rw, rb, labels, mask, drop, **kw):
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    loss = fn(h, w, rh, rw, labels, mask, drop, alpha=0.9, beta=0.75, bias=b, ref_bias=rb, **kw)
    loss.backward()
    return loss.detach().float(), h.grad.float(), w.grad.float()


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not op.interpreter_ready():
        sys.exit("on CPU, run with TRITON_INTERPRET=1 (set before Python starts)")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        worst = {"loss": 0.0, "grad_h": 0.0, "grad_w": 0.0}
        for n, v, hid, chunk, block, case in CASES:
            for bias in (False, True):
                op._MAX_BLOCK_V = block
                x = _inputs(n, v, hid, case, dtype, device, bias)
                ref = _run(op.dual_masked_kl_ce_reference, *x)
                got = _run(op.dual_masked_kl_ce, *x, chunk_size=chunk, use_triton=True)
                for key, a, r in zip(worst, got, ref, strict=True):
                    worst[key] = max(worst[key], (a - r).abs().max().item())
        rows.append({"dtype": str(dtype).replace("torch.", ""), **worst})
    out = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU, Triton interpreter",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "cases": [list(c) for c in CASES],
        "max_abs_error": rows,
    }
    path = REPO / "benchmarks" / "results" / f"dmk_ce_errors_{device}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("| dtype | loss | d/dh | d/dW |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['loss']:.2e} | {r['grad_h']:.2e} | {r['grad_w']:.2e} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
