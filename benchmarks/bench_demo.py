"""Time `dsunlearn demo` end to end and record it.

    .venv/bin/python benchmarks/bench_demo.py [--ranks 2]

Writes benchmarks/results/demo.json (wall time, machine, the report's table with the gold row,
forget quality, the selected steps) and prints the line to put in benchmarks/RESULTS.md. The venv must already be built (the demo's budget
excludes the install).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    t0 = time.time()
    cmd = [sys.executable, "-m", "dsunlearn", "demo", "--ranks", str(args.ranks)]
    proc = subprocess.run(cmd, cwd=REPO)
    elapsed = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"demo failed with exit code {proc.returncode}")
    report = json.loads((REPO / "runs" / "demo" / "report.json").read_text())
    result = {
        "benchmark": "demo_wall_time",
        "command": f"dsunlearn demo --ranks {args.ranks}",
        "machine": machine(),
        "wall_s": round(elapsed, 1),
        "report_elapsed_s": report["elapsed_s"],
        "world_size": report["world_size"],
        "vanilla": report["vanilla"],
        "gold": report.get("gold", {}),
        "methods": report["methods"],
        "forget_quality": {
            name: v["forget_quality"]
            for name, v in report.get("vs_gold", {}).items()
            if "forget_quality" in v
        },
        "selection": report["selection"],
        "val": report.get("val", {}),
        "timing": report.get("timing", {}),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = REPO / "benchmarks" / "results" / "demo.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{out}: demo took {elapsed:.1f} s on {result['machine']}")


if __name__ == "__main__":
    main()
