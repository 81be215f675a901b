"""Did each method forget, or only hide? The audit of every method over 3 worlds, at the
setting the equal-budget sweep chose for it (results/quality.json).

    .venv/bin/python benchmarks/audit.py [--seeds 0 1 2] [--methods ...] [--slots 2]

For each seed S and method M, one `dsunlearn unlearn --config configs/demo.yaml data.seed=S
seed=S methods=[M] <M's chosen setting on S> audit=true` on 1 rank: the method runs with its
in-run selection, then `dsunlearn audit`'s attacks run on its selected weights, against the
seed's gold and vanilla models (scored once per seed through `audit.reference_cache`).
`--slots` runs go side by side, seeds interleaved so that a seed's references are cached by
its first run before the next one starts.

Writes benchmarks/results/audit.json (every run's audit summary and key figures, wall times)
and prints the markdown table for RESULTS.md: per method, mean over seeds of each attack's
figure minus gold's (mean ± sample std), and on how many seeds each attack's verdict was
other than "removed" / "like gold".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from quality_runs import REPO, write_result

METHODS = ("ga", "graddiff", "kl_min", "npo", "siu", "mmunlearner")
# Figures of the audited model minus gold's under the same attack (higher: more comes back).
FIGURES = (
    ("after 20 relearning steps", "relearn"),
    ("recovery in 20 steps", "recovery"),
    ("int4 forget VQA", "int4"),
    ("int8 forget VQA", "int8"),
    ("probe (best layer)", "probe"),
    ("worst rephrasing", "rephrase"),
    ("best MIA AUC", "mia_auc"),
)


def chosen_settings(seed: int, method: str) -> list[str]:
    """The sweep's chosen setting of `method` on `seed` as key=value overrides."""
    quality = json.loads((REPO / "benchmarks/results/quality.json").read_text())
    params = quality["settings"][method][str(seed)]
    return [f"{k}={v}" for k, v in params.items()]


def run_one(seed: int, method: str, out: Path, extra: list[str], threads: int) -> dict[str, Any]:
    name = f"s{seed}-{method}"
    cmd = [sys.executable, "-m", "dsunlearn", "unlearn", "--config", "configs/demo.yaml"]
    cmd += [f"data.seed={seed}", f"seed={seed}", f"methods=[{method}]"]
    cmd += chosen_settings(seed, method)
    cmd += ["audit=true", f"audit.reference_cache={out / f'refs-s{seed}'}", "report_to=[]"]
    cmd += [f"out_dir={out}", f"name={name}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = round(time.time() - t0, 1)
    if proc.returncode != 0:
        tail = (out / f"{name}.log").read_text()[-2000:]
        sys.exit(f"{name}: exit {proc.returncode}\n{tail}")
    report = json.loads((out / name / "report.json").read_text())
    audit = json.loads((out / name / "audit" / method / "audit.json").read_text())
    print(f"{name}: {wall:.0f} s, {report['audit'][method]['verdicts']}", flush=True)
    return {"wall_s": wall, "summary": report["audit"][method], "attacks": audit["attacks"]}


def figures(attacks: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each FIGURES value of the audited model, gold and vanilla, each minus gold's under the
    same attack (the view, layer or statistic where it is furthest above gold): the gaps the
    audit's own judges compute, with each role in the judged model's place."""
    from dsunlearn.audit.verdict import JUDGES

    out: dict[str, dict[str, float]] = {}
    for role in ("model", "gold", "vanilla"):
        # margin 0: only the gaps are read here, not the verdicts
        v = {k: JUDGES[k]({"model": a[role], "gold": a["gold"]}, 0.0) for k, a in attacks.items()}
        out[role] = {
            "forget_vqa": attacks["rephrase"][role]["original"],
            "relearn": v["relearn"]["gap_at_step"],
            "recovery": v["relearn"]["recovery_vs_gold"],
            "int4": v["quant"]["int4_gap"],
            "int8": v["quant"]["int8_gap"],
            "probe": max(v["probe"]["middle"], v["probe"]["last"]),
            "rephrase": max(x for k, x in v["rephrase"].items() if k.endswith("_gap")),
            "mia_auc": max(x for k, x in v["mia"].items() if k not in ("status", "why")),
        }
    return out


def _mean_std(values: list[float], sign: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.3f} ± {std:.3f}"


def render(result: dict[str, Any]) -> None:
    print(f"\n{len(result['seeds'])} seeds x {len(result['runs'])} methods: "
          f"{result['wall_s']['total']:.0f} s\n")  # fmt: skip
    head = ["model", "forget VQA", *(c for c, _ in FIGURES), "verdicts (of seeds)"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---|" * (len(head) - 1))
    rows = [("vanilla", None), *((m, m) for m in result["runs"])]
    for label, method in rows:
        runs = result["runs"][method or next(iter(result["runs"]))]
        role = "model" if method else "vanilla"
        figs = [figures(r["attacks"])[role] for r in runs.values()]
        cells = [_mean_std([f["forget_vqa"] for f in figs], "")]
        cells += [_mean_std([f[key] for f in figs], "+") for _, key in FIGURES]
        if method:  # each attack's verdicts other than removed / like gold, over seeds
            verdicts = [r["summary"]["verdicts"] for r in runs.values()]
            counts: dict[str, int] = {}
            for v in verdicts:
                for attack, status in v.items():
                    if status not in ("removed", "like gold"):
                        counts[f"{attack} {status}"] = counts.get(f"{attack} {status}", 0) + 1
            cells.append(", ".join(f"{k} {n}/{len(runs)}" for k, n in counts.items()) or "none")
        else:
            cells.append("—")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--slots", type=int, default=2, help="runs side by side")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--replot", action="store_true", help="only print the table again")
    ap.add_argument("extra", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args()
    if args.replot:
        render(json.loads((REPO / "benchmarks/results/audit.json").read_text()))
        return
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.slots)
    jobs = [(s, m) for m in args.methods for s in args.seeds]  # seeds interleaved
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(args.slots) as pool:
            futures = {j: pool.submit(run_one, j[0], j[1], out, args.extra, threads) for j in jobs}
            done = {j: f.result() for j, f in futures.items()}
    total = round(time.time() - t0, 1)
    path = write_result(
        "audit",
        "benchmarks/audit.py --seeds " + " ".join(map(str, args.seeds))
        + f" --slots {args.slots}" + "".join(f" {e}" for e in args.extra),
        1,
        {
            "protocol": "each method at the sweep's chosen setting per seed (results/quality.json)"
            ", unlearn audit=true on 1 rank; figures are the audited model's minus gold's "
            "under the same attack (rephrasing: the worst view)",
            "seeds": args.seeds,
            "extra": args.extra,
            "wall_s": {"total": total, **{f"s{s}-{m}": done[(s, m)]["wall_s"] for s, m in jobs}},
            "runs": {m: {str(s): done[(s, m)] for s in args.seeds} for m in args.methods},
        },
    )  # fmt: skip
    render(json.loads(path.read_text()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
