"""Every method at the same tuning budget, over 3 worlds: chosen on validation, reported on test.

    .venv/bin/python benchmarks/quality.py [--seeds 0 1 2] [--trials 8] [--slots 2]

For each seed S (a world: its benchmark, its learned vanilla and gold models, shipped under
checkpoints/) and each method M, one `dsunlearn sweep --config configs/demo.yaml
--space configs/sweeps/M.yaml --trials T data.seed=S seed=S`: the same number of finished trials
for every method, each trial a real 1-rank unlearn run with in-run selection on the validation
split; the sweep chooses its trial on validation (gold_first over the Pareto front) and runs that
setting once more on the test split. `--slots` sweeps run side by side (each rank gets
cores/slots threads); the reference scores are shared through one `eval.reference_cache`.

Writes benchmarks/results/quality.json (every sweep's chosen trial: settings, validation outcome,
test metrics, forget quality; trial counts and wall times), the trade-off plot
benchmarks/plots/quality_tradeoff.png (gold, vanilla, each method's per-seed choices and mean),
and prints the markdown table for RESULTS.md: mean ± std over seeds.
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

from audit import figures
from quality_runs import REPO, write_result

METHODS = ("ga", "graddiff", "kl_min", "npo", "siu", "mmunlearner")
SLOWEST_FIRST = ("mmunlearner", "kl_min", "graddiff", "npo", "ga", "siu")
COLUMNS = (
    ("forget quality", "forget_quality"),
    ("forget VQA", "forget_vqa_acc"),
    ("gap to gold", "forget_vqa_gap"),
    ("forget held-out VQA", "forget_heldout_vqa_acc"),
    ("retain VQA", "retain_vqa_acc"),
    ("forget text QA", "forget_text_qa_acc"),
    ("retain text QA", "retain_text_qa_acc"),
    ("MIA AUC", "mia_mink20_auc_forget_vs_heldout"),
)
# From benchmarks/audit.py's runs of the same chosen settings: minus gold's, same attack.
AUDIT_COLUMNS = (("relearn recovery @20 vs gold", "recovery"), ("int4 forget VQA vs gold", "int4"))


def run_sweep(seed: int, method: str, trials: int, out: Path, threads: int) -> dict[str, Any]:
    """One sweep; its sweep.json plus its wall time."""
    sweep_dir = out / f"s{seed}-{method}"
    cmd = [
        sys.executable,
        "-m",
        "dsunlearn",
        "sweep",
        "--config",
        "configs/demo.yaml",
        "--space",
        f"configs/sweeps/{method}.yaml",
        "--trials",
        str(trials),
        "--study",
        f"quality-s{seed}-{method}",
        "--out",
        str(sweep_dir),
        f"data.seed={seed}",
        f"seed={seed}",
        f"out_dir={out}",
        f"eval.reference_cache={out / 'references'}",
        "report_to=[]",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    t0 = time.time()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = round(time.time() - t0, 1)
    if proc.returncode != 0:
        tail = sweep_dir.with_suffix(".log").read_text()[-2000:]
        sys.exit(f"sweep s{seed}-{method}: exit {proc.returncode}\n{tail}")
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    print(f"s{seed} {method}: {wall:.0f} s, {summary['counts']}", flush=True)
    return {"wall_s": wall, **summary}


def chosen_row(s: dict[str, Any]) -> dict[str, float]:
    c = s["chosen"]
    row = dict(c["test"])
    row["forget_quality"] = c["forget_quality"]["p_value"]
    row["forget_vqa_gap"] = row["forget_vqa_acc"] - c["gold_test"]["forget_vqa_acc"]
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(per_seed: dict[str, dict[str, dict]], refs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seed_markers = ("o", "^", "v", "<", ">")
    for ax, other in zip(axes, ("retain_vqa_acc", "forget_text_qa_acc"), strict=True):
        for name, marker in (("vanilla", "s"), ("gold", "D")):
            xs = [r["forget_vqa_acc"] for r in refs[name]]
            ys = [r[other] for r in refs[name]]
            ax.scatter(xs, ys, marker=marker, color="k", s=40, label=f"{name} (per seed)")
        for i, (name, seeds) in enumerate(per_seed.items()):
            c = colors[i % len(colors)]
            for j, r in enumerate(seeds.values()):  # one marker shape per seed
                marker = seed_markers[j % len(seed_markers)]
                ax.scatter([r["forget_vqa_acc"]], [r[other]], color=c, marker=marker, s=22)
            xs = [r["forget_vqa_acc"] for r in seeds.values()]
            ys = [r[other] for r in seeds.values()]
            ax.scatter(
                [statistics.fmean(xs)],
                [statistics.fmean(ys)],
                color=c,
                s=110,
                alpha=0.45,
                edgecolors="k",
                label=f"{name} (mean)",
            )
        ax.set_xlabel("forget_vqa_acc, test (gold: the target)")
        ax.set_ylabel(f"{other}, test (higher: more kept)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    seeds = ", ".join(
        f"{m} seed {s}" for m, s in zip(seed_markers, next(iter(per_seed.values())), strict=False)
    )
    fig.suptitle(
        "Each method's choice per seed (small; markers: " + seeds + ") and mean (large); "
        "equal tuning budgets"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _cell(mean_std: list[float], key: str) -> str:
    fmt = ".2g" if key == "forget_quality" else ".3f"  # p-values span many decades
    return f"{mean_std[0]:{fmt}} ± {mean_std[1]:{fmt}}"


def audit_cells() -> dict[str, list[str]]:
    """The audit's two columns for each row of the table (benchmarks/audit.py's results, if
    run): relearning recovery at 20 steps and int4 forget VQA, each minus gold's."""
    path = REPO / "benchmarks/results/audit.json"
    if not path.exists():
        return {}
    runs = json.loads(path.read_text())["runs"]
    figs = {m: [figures(r["attacks"]) for r in by_seed.values()] for m, by_seed in runs.items()}
    rows = {m: [f["model"] for f in fs] for m, fs in figs.items()}
    any_method = next(iter(figs.values()))  # gold's and vanilla's are the same in every run
    rows |= {role: [f[role] for f in any_method] for role in ("gold", "vanilla")}
    return {
        name: [_cell(list(mean_std([f[k] for f in fs])), k) for _, k in AUDIT_COLUMNS]
        for name, fs in rows.items()
    }


def render(result: dict[str, Any]) -> None:
    """The plot and the markdown table of a quality result (also for `--replot`)."""
    plot(result["per_seed"], result["references"], REPO / "benchmarks/plots/quality_tradeoff.png")
    n_seeds, n_methods = len(result["seeds"]), len(result["per_seed"])
    total = result["wall_s"]["total"]
    print(f"\n{n_seeds} seeds x {n_methods} methods x {result['trials']} trials: {total:.0f} s\n")
    columns = (*COLUMNS, *AUDIT_COLUMNS)
    print("| model | " + " | ".join(c for c, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    audit = audit_cells()
    for name, r in result["summary"].items():
        cells = [_cell(r[k], k) if k in r else "—" for _, k in COLUMNS]
        cells += audit.get(name, ["—"] * len(AUDIT_COLUMNS))
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nchosen settings (seed: values)")
    for m, by_seed in result["settings"].items():
        print(f"- {m}: " + "; ".join(f"{s}: {v}" for s, v in by_seed.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--slots", type=int, default=2, help="sweeps side by side")
    ap.add_argument("--out", help="keep the sweeps here (default: a temporary folder)")
    ap.add_argument(
        "--replot", action="store_true", help="only redraw the plot and table from the result"
    )
    args = ap.parse_args()
    if args.replot:
        render(json.loads((REPO / "benchmarks/results/quality.json").read_text()))
        return
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.slots)
    jobs = [(s, m) for m in SLOWEST_FIRST if m in args.methods for s in args.seeds]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        with ThreadPoolExecutor(args.slots) as pool:
            futures = {
                job: pool.submit(run_sweep, job[0], job[1], args.trials, out, threads)
                for job in jobs
            }
            sweeps = {job: f.result() for job, f in futures.items()}
    total = round(time.time() - t0, 1)

    methods = [m for m in METHODS if m in args.methods]
    per_seed = {m: {s: chosen_row(sweeps[(s, m)]) for s in args.seeds} for m in methods}
    first = {s: sweeps[(s, methods[0])]["chosen"] for s in args.seeds}
    refs = {
        "vanilla": [first[s]["vanilla_test"] for s in args.seeds],
        "gold": [first[s]["gold_test"] for s in args.seeds],
    }
    for name in ("vanilla", "gold"):
        for s, r in zip(args.seeds, refs[name], strict=True):
            r["forget_vqa_gap"] = r["forget_vqa_acc"] - first[s]["gold_test"]["forget_vqa_acc"]
            if name == "vanilla":
                r["forget_quality"] = first[s]["vanilla_forget_quality"]["p_value"]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for name, seeds in [("vanilla", refs["vanilla"]), ("gold", refs["gold"])]:
        rows[name] = {k: mean_std([r[k] for r in seeds]) for _, k in COLUMNS if k in seeds[0]}
    for m in methods:
        rows[m] = {k: mean_std([per_seed[m][s][k] for s in args.seeds]) for _, k in COLUMNS}
    settings = {
        m: {str(s): sweeps[(s, m)]["chosen"]["params"] for s in args.seeds} for m in methods
    }
    path = write_result(
        "quality",
        "benchmarks/quality.py --seeds "
        + " ".join(map(str, args.seeds))
        + f" --trials {args.trials} --slots {args.slots}",
        1,
        {
            "protocol": "one sweep per seed and method (configs/sweeps/<method>.yaml), "
            f"{args.trials} finished trials each, chosen on validation (gold_first over the "
            "Pareto front), reported on test",
            "seeds": args.seeds,
            "trials": args.trials,
            "slots": args.slots,
            "wall_s": {"total": total, **{f"s{s}-{m}": sweeps[(s, m)]["wall_s"] for s, m in jobs}},
            "summary": {n: {k: list(v) for k, v in r.items()} for n, r in rows.items()},
            "per_seed": {m: {str(s): r for s, r in v.items()} for m, v in per_seed.items()},
            "references": refs,
            "settings": settings,
            "sweeps": {
                f"s{s}-{m}": {
                    "counts": sweeps[(s, m)]["counts"],
                    "front": sweeps[(s, m)]["front"],
                    "chosen": sweeps[(s, m)]["chosen"],
                    "trials": sweeps[(s, m)]["trials"],
                }
                for s, m in jobs
            },
        },
    )
    render(json.loads(path.read_text()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
