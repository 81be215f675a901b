"""MMUnlearner's settings over 3 data + training seeds: which one holds beyond the world it was
tuned on?

    .venv/bin/python benchmarks/mmu_seeds.py [--seeds 0 1 2] [--ranks 2] [--variants 0 3]

For each setting and seed S, one `dsunlearn unlearn --config configs/demo.yaml
methods=[mmunlearner] data.seed=S seed=S <overrides>` run on 2 ZeRO-3 ranks (the vanilla model
of that seed, as `quality.py` uses). Every run is checked against the targets of
`mmu_quality.py`. Writes benchmarks/results/mmu_seeds.json and prints, per setting, the mean ±
std of each metric and the targets met on each seed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mmu_quality import METRICS, row
from quality import mean_std
from quality_runs import run_unlearn, write_result

# (label, overrides); the first is the demo's setting.
VARIANTS: list[tuple[str, list[str]]] = [
    ("vision mask, tau 1, lr 5e-4 (demo)", []),
    ("vision mask, tau 1, lr 1e-3", ["method.mmu_lr=1e-3"]),
    (
        "vision mask, topk 10%, lr 5e-4",
        ["method.mmu_mask.mode=topk", "method.mmu_mask.topk_pct=10"],
    ),
    (
        "both masks, tau 2, lr 3e-4",
        ["method.mmu_mask.modules=both", "method.mmu_mask.tau=2", "method.mmu_lr=3e-4"],
    ),
    (
        "both masks, tau 1, lr 3e-4",
        ["method.mmu_mask.modules=both", "method.mmu_lr=3e-4"],
    ),
    (
        "language mask (the paper's), tau 1, lr 2e-4",
        ["method.mmu_mask.modules=language", "method.mmu_lr=2e-4"],
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--variants", type=int, nargs="+", help="indices into VARIANTS (default all)")
    args = ap.parse_args()
    chosen = [VARIANTS[i] for i in args.variants] if args.variants else VARIANTS
    t0 = time.time()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, overrides) in enumerate(chosen):
            for seed in args.seeds:
                cli = ["--config", "configs/demo.yaml", "methods=[mmunlearner]"]
                cli += [f"data.seed={seed}", f"seed={seed}", *overrides]
                report, wall_s = run_unlearn(args.ranks, cli, Path(tmp), f"v{k}s{seed}")
                runs.append(
                    row(label, overrides, wall_s, report, "mmunlearner")
                    | {"seed": seed, "vanilla": {k: report["vanilla"][k] for k in METRICS}}
                )
                met = sum(runs[-1]["targets"].values())
                print(f"{label} seed {seed}: {met}/4 {runs[-1]['metrics']}", flush=True)
    total = round(time.time() - t0, 1)
    summary = {}
    for label, _ in chosen:
        mine = [r for r in runs if r["setting"] == label]
        summary[label] = {
            "metrics": {k: list(mean_std([r["metrics"][k] for r in mine])) for k in METRICS},
            "targets_met": {str(r["seed"]): sum(r["targets"].values()) for r in mine},
        }
    path = write_result(
        "mmu_seeds",
        "benchmarks/mmu_seeds.py --seeds " + " ".join(map(str, args.seeds)),
        args.ranks,
        {"wall_s": total, "summary": summary, "runs": runs},
    )
    shown = METRICS[:6]
    print(f"\n{len(runs)} runs, {total:.0f} s\n")
    print("| setting | " + " | ".join(shown) + " | targets met per seed |")
    print("|---|" + "---|" * (len(shown) + 1))
    for label, s in summary.items():
        cells = " | ".join(f"{s['metrics'][k][0]:.3f} ± {s['metrics'][k][1]:.3f}" for k in shown)
        met = ", ".join(f"{v}/4" for v in s["targets_met"].values())
        print(f"| {label} | {cells} | {met} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
