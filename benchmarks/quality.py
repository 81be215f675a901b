"""Every method on the built-in benchmark, over 3 data + training seeds: mean ± std per metric.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2] [--ranks 2]

For each seed S, one `dsunlearn unlearn --config configs/demo.yaml data.seed=S seed=S` run on
2 ZeRO-3 ranks (GA, GradDiff, KL_Min, NPO, SIU and MMUnlearner in ONE report, from the vanilla
model learned for that data seed: `dsunlearn learn data.seed=S seed=S` first, cached under
checkpoints/vanilla/). Writes benchmarks/results/quality.json, the trade-off plot
benchmarks/plots/quality_tradeoff.png (forget VQA accuracy against retain VQA accuracy and
against forget text QA accuracy, one point per method, bars = std over seeds) and prints the
markdown table for RESULTS.md with the total wall time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from quality_runs import REPO, run_unlearn, write_result

METRICS = (
    "forget_vqa_acc",
    "forget_heldout_vqa_acc",
    "forget_text_qa_acc",
    "retain_vqa_acc",
    "retain_heldout_vqa_acc",
    "retain_text_qa_acc",
    "forget_gen_rouge_l",
    "retain_gen_rouge_l",
    "eff",
    "gen",
    "flu",
    "div",
)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(summary: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    for ax, other in zip(axes, ("retain_vqa_acc", "forget_text_qa_acc"), strict=True):
        for name, m in summary.items():
            (x, dx), (y, dy) = m["forget_vqa_acc"], m[other]
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=3, label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("forget_vqa_acc (lower: more forgotten)")
        ax.set_ylabel(f"{other} (higher: more kept)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Built-in benchmark, mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    reports: dict[int, dict] = {}
    walls: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cli = ["--config", "configs/demo.yaml", f"data.seed={seed}", f"seed={seed}"]
            reports[seed], walls[seed] = run_unlearn(args.ranks, cli, Path(tmp), f"s{seed}")
            print(f"seed {seed}: {walls[seed]:.0f} s", flush=True)
    methods = ["vanilla", *reports[args.seeds[0]]["methods"]]

    def row(report: dict, name: str) -> dict[str, float]:
        return report["vanilla"] if name == "vanilla" else report["methods"][name]

    summary = {
        name: {key: mean_std([row(reports[s], name)[key] for s in args.seeds]) for key in METRICS}
        for name in methods
    }
    total = round(time.time() - t0, 1)
    path = write_result(
        "quality",
        "benchmarks/quality.py --seeds " + " ".join(map(str, args.seeds)),
        args.ranks,
        {
            "seeds": args.seeds,
            "wall_s": {"total": total, **{str(s): w for s, w in walls.items()}},
            "summary": {n: {k: list(v) for k, v in m.items()} for n, m in summary.items()},
            "per_seed": {
                str(s): r["methods"] | {"vanilla": r["vanilla"]} for s, r in reports.items()
            },
        },
    )
    plot(summary, REPO / "benchmarks" / "plots" / "quality_tradeoff.png")
    print(f"\n{len(args.seeds)} seeds, {args.ranks} ranks, {total:.0f} s in all\n")
    print("| model | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for name, m in summary.items():
        cells = " | ".join(f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in METRICS)
        print(f"| {name} | {cells} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
