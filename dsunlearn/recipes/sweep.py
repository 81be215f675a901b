"""Sweep recipe: an Optuna study over one method's settings, each trial a real unlearn run.

    dsunlearn sweep --config F --space configs/sweeps/npo.yaml --trials N [--study NAME]

Read top to bottom:
  1. the trials' config (the config file, key=value overrides, the space's `fixed:`) and the
     space file are checked; the study is created in the storage or joined (sweep/worker.py);
  2. this process works as one worker until the study has N finished trials (other workers —
     processes, nodes, Slurm array tasks — may work on it at the same time);
  3. the first worker to find the study finished writes the summary (a lock file keeps it to
     one): every trial, the Pareto front on validation, the chosen trial (`choose:` rule),
     that setting run once more with the test split (the only time the sweep reads test),
     `sweep.json` and `sweep.png`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsunlearn.config import (
    UnlearnConfig,
    apply_overrides,
    config_hash,
    from_dict,
    load_config,
    to_dict,
)
from dsunlearn.engine import watchdog
from dsunlearn.errors import ConfigError
from dsunlearn.fsutil import write_json_atomic
from dsunlearn.sweep.outcome import SweepError, choose, pareto_front
from dsunlearn.sweep.space import Space, as_overrides, load_space
from dsunlearn.sweep.worker import (
    TrialLaunch,
    Worker,
    build_pruner,
    open_storage,
    open_study,
    say,
    trial_record,
)


def run_sweep(
    config: str,
    space_file: str,
    trials: int,
    overrides: list[str],
    study_name: str | None = None,
    storage: str | None = None,
    ranks: int = 1,
    out: str | None = None,
    stale_after_s: float = 120.0,
) -> Path:
    t0 = time.time()
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {ranks}")
    cfg = load_config(UnlearnConfig, config, overrides)
    space = load_space(space_file, to_dict(cfg))
    trial_cfg = from_dict(UnlearnConfig, apply_overrides(to_dict(cfg), as_overrides(space.fixed)))
    if not trial_cfg.eval.enabled or trial_cfg.eval.every <= 0:
        raise ConfigError(
            "a sweep chooses on in-run validation: set eval.every > 0 (in the config, an "
            "override or the space's fixed:)"
        )
    from dsunlearn.recipes.unlearn import resolve_vanilla

    resolve_vanilla(trial_cfg)  # no learned vanilla model: one line now, not N failed trials
    name = study_name or f"{cfg.name}-{space.method}"
    sweep_dir = Path(out) if out else Path(cfg.out_dir) / "sweeps" / name
    storage_spec = storage or str(sweep_dir / "journal.log")
    setup_key = config_hash(
        {"config": to_dict(cfg), "space": Path(space_file).read_text(), "ranks": ranks}
    )
    store = open_storage(storage_spec)
    study = open_study(store, name, space, setup_key)
    launch = TrialLaunch(
        config=config,
        overrides=[*overrides, *as_overrides(space.fixed)],
        space=space,
        base=to_dict(trial_cfg),
        ranks=ranks,
        sweep_dir=sweep_dir,
        reference_cache=trial_cfg.eval.reference_cache or str(sweep_dir / "references"),
    )
    worker = Worker(study, store, launch, trials, build_pruner(space.pruner))
    worker.stale_after_s = stale_after_s
    say(f"study '{name}' in {storage_spec}: {space.method}, {trials} trials, {ranks} rank(s)")
    worker.run()
    say(f"study '{name}' has {trials} finished trials (this worker ran {len(worker.ran)})")
    with _summary_lock(sweep_dir, stale_after_s) as mine:
        if not mine:
            say("another worker is writing the summary")
            return sweep_dir / "sweep.json"
        return summarize(study, launch, storage_spec, time.time() - t0)


@contextlib.contextmanager
def _summary_lock(sweep_dir: Path, stale_after_s: float) -> Iterator[bool]:
    """One summary per study: O_EXCL creation is atomic on local and NFS (v3+) filesystems.
    A lock whose holder died (same host) or that is older than `stale_after_s` is taken over."""
    lock = sweep_dir / "summary.lock"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = json.loads(lock.read_text() or "{}")
            same_host = holder.get("host") == os.uname().nodename
            gone = same_host and not watchdog.is_alive(holder.get("id", ""))
            if gone or time.time() - lock.stat().st_mtime > stale_after_s:
                lock.unlink(missing_ok=True)
                continue
            yield False
            return
        with os.fdopen(fd, "w") as f:
            json.dump({"host": os.uname().nodename, "id": watchdog.identity()}, f)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def summarize(study: Any, launch: TrialLaunch, storage_spec: str, wall_s: float) -> Path:
    """sweep.json and sweep.png; the chosen setting's run on the test split."""
    space = launch.space
    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t["state"] == "complete"]
    front = pareto_front(complete, space.objectives)
    number, why = choose(complete, front, space.choose)
    chosen = next(t for t in complete if t["number"] == number)
    test = run_chosen_on_test(launch, chosen)
    counts = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    summary = {
        "study": study.study_name,
        "storage": storage_spec,
        "space": space.path,
        "method": space.method,
        "ranks": launch.ranks,
        "objectives": [{"name": o.name, "direction": o.direction} for o in space.objectives],
        "counts": counts,
        "front": front,
        "chosen": {
            "number": number,
            "rule": space.choose,
            "why": why,
            "params": chosen["params"],
            "val": chosen["outcome"],
            **test,
        },
        "trials": trials,
        "summary_wall_s": round(wall_s, 1),
    }
    path = launch.sweep_dir / "sweep.json"
    write_json_atomic(path, summary)
    plot_sweep(summary, space, launch.sweep_dir / "sweep.png")
    say(f"chosen trial {number} ({why}): {chosen['params']}")
    say(f"test: {test['test']}")
    say(f"wrote {path} and {launch.sweep_dir / 'sweep.png'}")
    return path


def run_chosen_on_test(launch: TrialLaunch, chosen: dict[str, Any]) -> dict[str, Any]:
    """The chosen setting once more, now with the test split: its report is the verdict.
    The run is deterministic, so it selects the same step as the trial did (checked)."""
    name = f"chosen-trial-{chosen['number']:04d}"
    run_dir = launch.sweep_dir / name
    if not (run_dir / "report.json").is_file():
        args = launch.args(name, chosen["params"], test=True, resume=True)
        proc = launch.start(args, launch.sweep_dir, launch.sweep_dir / f"{name}.log")
        if proc.wait() != 0:
            raise SweepError(
                f"the chosen setting's test run failed (exit {proc.returncode}): see "
                f"{launch.sweep_dir / f'{name}.log'}"
            )
    report = json.loads((run_dir / "report.json").read_text())
    m = launch.space.method
    sel = report["selection"][m]
    out = {
        "test": report["methods"][m],
        "test_report": str(run_dir / "report.json"),
        "selected_step": sel.get("step"),
        "same_selection_as_trial": sel.get("step") == chosen["outcome"]["selected_step"],
        "vanilla_test": report.get("vanilla"),
        "gold_test": report.get("gold"),
    }
    if "vs_gold" in report:
        out["forget_quality"] = report["vs_gold"][m]["forget_quality"]
        out["gap_to_gold"] = report["vs_gold"][m]["gap"]
        out["vanilla_forget_quality"] = report["vs_gold"]["vanilla"]["forget_quality"]
    return out


def plot_sweep(summary: dict[str, Any], space: Space, path: Path) -> None:
    """All complete trials on the first two objectives, the front, the chosen point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in summary["trials"] if t["state"] == "complete"]
    names = [o["name"] for o in summary["objectives"]]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))

    def xy(t: dict[str, Any]) -> tuple[float, float]:
        v = t["values"]
        return (v[0], v[1]) if len(v) > 1 else (t["number"], v[0])

    xs, ys = zip(*(xy(t) for t in complete), strict=True) if complete else ((), ())
    ax.scatter(xs, ys, c="tab:blue", s=22, label=f"trials ({len(complete)} complete)")
    front = sorted(xy(t) for t in complete if t["number"] in summary["front"])
    if front:
        ax.plot(*zip(*front, strict=True), "-o", c="tab:orange", ms=4, label="Pareto front")
    cx, cy = xy(next(t for t in complete if t["number"] == summary["chosen"]["number"]))
    ax.scatter([cx], [cy], marker="*", s=220, c="tab:red", zorder=5, label="chosen")
    if names[:2] == ["forget_gap", "retain_kept"]:
        ax.scatter([0.0], [1.0], marker="D", c="k", s=30, label="gold (0, 1)")
    ax.set_xlabel(names[0] if len(names) > 1 else "trial")
    ax.set_ylabel(names[1] if len(names) > 1 else names[0])
    pruned = summary["counts"]["pruned"]
    ax.set_title(f"{summary['study']}: {space.method}, validation ({pruned} pruned)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
