"""MMUnlearner on the built-in benchmark against GA and NPO, and against the issue's targets.

    .venv/bin/python benchmarks/mmu_quality.py [--ranks 2] [--quick]

The first run is `dsunlearn unlearn --config configs/demo.yaml methods=[ga,npo,mmunlearner]`:
the three methods in ONE report, from the same vanilla model and the same data. The next runs
vary MMUnlearner's settings (mask modules, threshold, learning rate) with `methods=[mmunlearner]`
(~2 min each on 2 CPU cores).
Every row is checked against:

    forget_vqa_acc         <= chance + 0.1      (training images of the forgotten people)
    forget_heldout_vqa_acc <= chance + 0.1      (their held-out images)
    forget_text_qa_acc     >= 0.95 x vanilla    (their facts, asked by name: text is kept)
    retain_vqa_acc         >= 0.95 x vanilla    (other people's faces are kept)

Writes benchmarks/results/mmu_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from quality_runs import finish, run_unlearn

COMPARED = ("ga", "npo", "mmunlearner")
# (label, overrides) of the MMUnlearner variants; the demo's settings (vision mask, tau 1,
# lr 5e-4) are the compared run. The first is the paper's filter at the baselines' lr.
VARIANTS: list[tuple[str, list[str]]] = [
    (
        "language mask (the paper's), tau 1, lr 2e-4",
        ["method.mmu_mask.modules=language", "method.mmu_lr=2e-4"],
    ),
    ("language mask, tau 1, lr 1e-3", ["method.mmu_mask.modules=language", "method.mmu_lr=1e-3"]),
    (
        "language mask, tau 3, lr 2e-4",
        ["method.mmu_mask.modules=language", "method.mmu_mask.tau=3", "method.mmu_lr=2e-4"],
    ),
    (
        "language mask, topk 50%, lr 2e-4",
        ["method.mmu_mask.modules=language", "method.mmu_mask.mode=topk", "method.mmu_lr=2e-4"],
    ),
    ("both masks, tau 1, lr 2e-4", ["method.mmu_mask.modules=both", "method.mmu_lr=2e-4"]),
    (
        "both masks, tau 2, lr 3e-4",
        ["method.mmu_mask.modules=both", "method.mmu_mask.tau=2", "method.mmu_lr=3e-4"],
    ),
    ("vision mask, tau 1, lr 2e-4", ["method.mmu_lr=2e-4"]),
    ("vision mask, tau 1, lr 1e-3", ["method.mmu_lr=1e-3"]),
]
METRICS = (
    "forget_vqa_acc",
    "forget_heldout_vqa_acc",
    "forget_text_qa_acc",
    "retain_vqa_acc",
    "retain_heldout_vqa_acc",
    "retain_text_qa_acc",
    "eff",
    "gen",
    "flu",
)


def targets(m: dict[str, float], vanilla: dict[str, float], chance: float) -> dict[str, bool]:
    return {
        "forget_vqa<=chance+0.1": m["forget_vqa_acc"] <= chance + 0.1,
        "forget_heldout<=chance+0.1": m["forget_heldout_vqa_acc"] <= chance + 0.1,
        "forget_text>=0.95xvanilla": m["forget_text_qa_acc"]
        >= 0.95 * vanilla["forget_text_qa_acc"],
        "retain_vqa>=0.95xvanilla": m["retain_vqa_acc"] >= 0.95 * vanilla["retain_vqa_acc"],
    }


def row(label: str, overrides: list[str], wall_s: float, report: dict, method: str) -> dict:
    m = report["methods"][method]
    return {
        "setting": label,
        "method": method,
        "overrides": overrides,
        "wall_s": wall_s,
        "metrics": {key: m[key] for key in METRICS},
        "targets": targets(m, report["vanilla"], report["chance"]),
        "info": report.get("method_info", {}).get(method, {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the GA / NPO / MMUnlearner run")
    args = ap.parse_args()
    base = ["--config", "configs/demo.yaml"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report, wall_s = run_unlearn(
            args.ranks, [*base, f"methods=[{','.join(COMPARED)}]"], out, "c"
        )
        vanilla, chance = report["vanilla"], report["chance"]
        rows = [row(f"{m} (demo settings)", [], wall_s, report, m) for m in COMPARED]
        for r in rows:
            print(r["setting"], r["metrics"], flush=True)
        for k, (label, overrides) in enumerate([] if args.quick else VARIANTS):
            cli = [*base, "methods=[mmunlearner]", *overrides]
            report, wall_s = run_unlearn(args.ranks, cli, out, f"v{k}")
            rows.append(row(f"mmunlearner, {label}", overrides, wall_s, report, "mmunlearner"))
            print(rows[-1]["setting"], rows[-1]["metrics"], flush=True)
    finish("mmu_quality", args.quick, args.ranks, chance, vanilla, METRICS, rows)


if __name__ == "__main__":
    main()
