"""What the quality scripts share: run `dsunlearn unlearn` through the deepspeed launcher, name
the machine, and print a markdown table of metrics against targets."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsunlearn.recipes.demo import deepspeed_launch_cmd, launch_env  # noqa: E402


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}"


def run_unlearn(ranks: int, cli: list[str], out_dir: Path, name: str) -> tuple[dict, float]:
    """One `dsunlearn unlearn CLI name=NAME out_dir=OUT_DIR` run; its report and wall time.
    Exits with the run's last stderr lines when it fails."""
    t0 = time.time()
    proc = subprocess.run(
        deepspeed_launch_cmd(ranks, ["unlearn", *cli, f"name={name}", f"out_dir={out_dir}"]),
        cwd=REPO,
        env=launch_env(ranks),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    report = json.loads((out_dir / name / "report.json").read_text())
    return report, round(time.time() - t0, 1)


def write_result(name: str, command: str, ranks: int, fields: dict[str, Any]) -> Path:
    """results/<name>.json: what ran, where and when (benchmark, command, machine, ranks, date),
    then `fields`."""
    payload = {
        "benchmark": name,
        "command": command,
        "machine": machine(),
        "ranks": ranks,
        "date": time.strftime("%Y-%m-%d"),
        **fields,
    }
    path = REPO / "benchmarks" / "results" / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(
    metrics: tuple[str, ...], vanilla: dict[str, float], rows: list[dict[str, Any]]
) -> None:
    """Rows carry `setting`, `metrics` and `targets` ({name: bool})."""
    names = list(rows[0]["targets"])
    print("\n| setting | " + " | ".join(metrics) + " | targets met |")
    print("|---|" + "---|" * (len(metrics) + 1))
    print("| vanilla | " + " | ".join(f"{vanilla[x]:.3f}" for x in metrics) + " | |")
    for r in rows:
        met = [n for n in names if r["targets"][n]]
        cells = " | ".join(f"{r['metrics'][x]:.3f}" for x in metrics)
        print(f"| {r['setting']} | {cells} | {len(met)}/{len(names)}: {', '.join(met)} |")


def finish(
    name: str,
    quick: bool,
    ranks: int,
    chance: float,
    vanilla: dict[str, float],
    metrics: tuple[str, ...],
    rows: list[dict[str, Any]],
) -> None:
    """Write results/<name>.json (machine, date, vanilla, every row) and print the table."""
    path = write_result(
        name,
        f"benchmarks/{name}.py" + (" --quick" if quick else ""),
        ranks,
        {"chance": chance, "vanilla": {key: vanilla[key] for key in metrics}, "runs": rows},
    )
    print_table(metrics, vanilla, rows)
    print(f"wrote {path}")
