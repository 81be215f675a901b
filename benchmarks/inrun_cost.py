"""What in-run evaluation costs: the demo's unlearning run with and without it, in one run.

    .venv/bin/python benchmarks/inrun_cost.py [--ranks 2] [--every 4]

Both runs are `dsunlearn unlearn --config configs/demo.yaml` on the same ranks, one after the
other: with `eval.every=EVERY` (the demo's setting: 6 validation evaluations of each 24-step
method, 3 of SIU's 12 steps, the vanilla and gold models on the validation split, the selected
weights kept aside and put back) and with `eval.every=0` (no validation, the last step). The
ratio of their wall times (the launcher's, model loading and test evaluation included) is the
cost; the per-method split (train / validation / test seconds) comes from each report.
Writes results/inrun_cost.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from quality_runs import REPO, run_unlearn, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    cli = ["--config", str(REPO / "configs" / "demo.yaml"), "report_to=[]"]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="inrun-cost-") as tmp:
        out = Path(tmp)
        for name, every in (("with", args.every), ("without", 0)):
            report, wall = run_unlearn(args.ranks, [*cli, f"eval.every={every}"], out, name)
            runs[name] = {
                "eval.every": every,
                "wall_s": wall,
                "report_elapsed_s": report["elapsed_s"],
                "timing": report["timing"],
                "evaluations": {m: len(c) for m, c in report.get("curves", {}).items()},
                "selected": {m: s["step"] for m, s in report["selection"].items()},
            }
            print(f"{name}: {wall:.1f} s")
    ratio = runs["with"]["wall_s"] / runs["without"]["wall_s"]
    path = write_result(
        "inrun_cost",
        f"benchmarks/inrun_cost.py --ranks {args.ranks} --every {args.every}",
        args.ranks,
        {"ratio_wall": round(ratio, 3), "target": 1.3, "runs": runs},
    )
    print(f"in-run evaluation costs {ratio:.3f}x the run without it; {path}")


if __name__ == "__main__":
    main()
