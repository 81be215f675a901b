"""`dsunlearn eval --benchmark NAME` on all four benchmarks, as a user runs it, on a model that
has unlearned something: what every protocol reports, and how long it takes.

    .venv/bin/python benchmarks/eval_protocols.py [--ranks 1] [--max-items 60]

1. `dsunlearn unlearn --config configs/demo.yaml methods=[ga]` on 2 ZeRO-3 ranks (GA: the
   baseline that forgets on every seed), its final checkpoint exported with `dsunlearn export`;
2. the data: the built-in benchmark (builtin), a copy of it with a `Retain_Set/` of celebrities
   (mllmu, `fixtures.add_mllmu_celebrities`), and CLEAR and MMUBench folders in their published
   schemas (`fixtures.write_clear_fixture`, `write_mmubench_fixture`; the same fictitious
   people, so they are NOT the pictures the tiny model was trained on);
3. `dsunlearn eval --benchmark NAME --model GA --vanilla VANILLA max_items=N` for each.

Writes benchmarks/results/eval_protocols.json and prints, per benchmark, its wall time and every
metric of the vanilla and GA rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quality_runs import REPO, write_result

from dsunlearn.config import UnlearnConfig, load_config
from dsunlearn.data.fixtures import (
    add_mllmu_celebrities,
    write_clear_fixture,
    write_mmubench_fixture,
)
from dsunlearn.recipes.demo import deepspeed_launch_cmd, launch_env
from dsunlearn.recipes.unlearn import resolve_vanilla

DEMO = REPO / "configs" / "demo.yaml"


def _run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Run `cmd` in the repository; its wall time. Exits with its last stderr lines on failure."""
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} ...: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return round(time.time() - t0, 1)


def _cli(ranks: int, args: list[str]) -> list[str]:
    return (
        deepspeed_launch_cmd(ranks, args)
        if ranks > 1
        else [sys.executable, "-m", "dsunlearn", *args]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1, help="ranks of each eval (unlearning: 2)")
    ap.add_argument("--max-items", type=int, default=60, help="per-metric cap of each eval")
    args = ap.parse_args()
    cfg = load_config(UnlearnConfig, DEMO, [])
    vanilla = resolve_vanilla(cfg)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        unlearn = ["unlearn", "--config", str(DEMO), "methods=[ga]", "eval.enabled=false"]
        unlearn += ["checkpoint.final=true", "name=ga", f"out_dir={tmp}"]
        unlearn_s = _run(deepspeed_launch_cmd(2, unlearn), launch_env(2))
        model = tmp / "ga-model"
        export = ["export", "--ckpt", str(tmp / "ga" / "checkpoints" / "ga"), "--out", str(model)]
        export_s = _run([sys.executable, "-m", "dsunlearn", *export])
        print(f"unlearn (GA, 2 ranks) {unlearn_s} s, export {export_s} s", flush=True)

        builtin = REPO / cfg.data.resolved_path()
        mllmu = tmp / "mllmu"
        shutil.copytree(builtin, mllmu)
        add_mllmu_celebrities(mllmu)
        data = {
            "builtin": builtin,
            "mllmu": mllmu,
            "clear": write_clear_fixture(tmp / "clear"),
            "mmubench": write_mmubench_fixture(tmp / "mmubench"),
        }
        for name, path in data.items():
            out = tmp / f"eval-{name}"
            cmd = ["eval", "--benchmark", name, "--model", str(model), "--data", str(path)]
            cmd += ["--vanilla", vanilla, "--out", str(out), f"max_items={args.max_items}"]
            wall_s = _run(_cli(args.ranks, cmd), launch_env(args.ranks))
            report = json.loads((out / "report.json").read_text())
            (row,) = report["methods"].values()
            results[name] = {
                "wall_s": wall_s,
                "vanilla": report["vanilla"],
                "ga": row,
                "benchmark": report.get("benchmark", {}),
            }
            print(f"{name}: {wall_s} s, {len(row)} metrics", flush=True)
    path = write_result(
        "eval_protocols",
        f"benchmarks/eval_protocols.py --ranks {args.ranks} --max-items {args.max_items}",
        args.ranks,
        {
            "max_items": args.max_items,
            "vanilla": vanilla,
            "unlearn_s": unlearn_s,
            "export_s": export_s,
            "benchmarks": results,
        },
    )
    for name, r in results.items():
        print(f"\n{name} ({r['wall_s']} s)\n\n| metric | vanilla | ga |\n|---|---|---|")
        for key, v in r["ga"].items():
            print(f"| {key} | {r['vanilla'].get(key, float('nan')):.3f} | {v:.3f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
