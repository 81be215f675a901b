"""What a trial scored (validation only), the Pareto front, and the trial a sweep reports.

A trial's outcome is read from its run's report: the selected step's validation metrics and the
selection's targets (gold's forget metric, vanilla's retain metric on the validation split):

- ``forget_gap = |forget - gold_forget|``: distance from the model that never saw the faces;
- ``retain_kept = min(1, retain / vanilla_retain)``: share of retain utility kept;
- ``score = retain_kept - forget_gap``: the in-run selection's score (eval/selection.py).

Choice rules, over the front:
- ``gold_first``: the smallest forget_gap among trials that keep >= 95% of retain (ties: more
  retain kept, then the earlier trial); if none keeps that much, the best score;
- ``best_score``: the best score (ties: the earlier trial).
"""

from __future__ import annotations

from typing import Any

from dsunlearn.errors import DsunlearnError
from dsunlearn.sweep.space import Objective

RETAIN_SHARE = 0.95  # gold_first's bar, as in-run selection's default select.retain_share


class SweepError(DsunlearnError):
    """A sweep cannot go on (a trial run failed on bad input, a missing metric ...)."""


def trial_outcome(report: dict[str, Any], method: str) -> dict[str, Any]:
    """The selected step's validation figures of `method` in a trial's report."""
    sel = report.get("selection", {}).get(method, {})
    t, val = sel.get("targets"), sel.get("val")
    if not t or not val:
        raise SweepError(
            f"the trial's report has no validation selection for {method}: the sweep needs "
            "in-run evaluation (eval.every > 0) on a benchmark with forget and retain metrics"
        )
    vr = t["vanilla_retain"]
    kept = 1.0 if vr <= 0 else min(1.0, val[t["retain_key"]] / vr)
    gap = abs(val[t["forget_key"]] - t["gold_forget"])
    return {
        "forget_gap": gap,
        "retain_kept": kept,
        "score": kept - gap,
        "selected_step": sel.get("step"),
        "steps_run": sel.get("steps_run"),
        "val": val,
        "targets": t,
    }


def objective_values(outcome: dict[str, Any], objectives: list[Objective]) -> list[float]:
    out = []
    for o in objectives:
        if o.name in outcome and o.name not in ("val", "targets"):
            out.append(float(outcome[o.name]))
        elif o.name in outcome["val"]:
            out.append(float(outcome["val"][o.name]))
        else:
            raise SweepError(
                f"objective '{o.name}' is not a validation metric of this benchmark "
                f"(it has: {', '.join(sorted(outcome['val']))})"
            )
    return out


def _dominates(a: list[float], b: list[float], objectives: list[Objective]) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    better = False
    for x, y, o in zip(a, b, objectives, strict=True):
        if o.direction == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(trials: list[dict[str, Any]], objectives: list[Objective]) -> list[int]:
    """Numbers of the complete trials that no other complete trial dominates."""
    front = []
    for t in trials:
        if not any(_dominates(u["values"], t["values"], objectives) for u in trials if u is not t):
            front.append(t["number"])
    return front


def choose(trials: list[dict[str, Any]], front: list[int], rule: str) -> tuple[int, str]:
    """(trial number, why) by `rule` among the front's trials."""
    cands = [t for t in trials if t["number"] in front]
    if not cands:
        raise SweepError("no complete trial to choose from")

    def best_score() -> tuple[int, str]:
        t = max(cands, key=lambda t: (t["outcome"]["score"], -t["number"]))
        return t["number"], f"best validation score {t['outcome']['score']:.3f} on the front"

    if rule == "best_score":
        return best_score()
    keep = [t for t in cands if t["outcome"]["retain_kept"] >= RETAIN_SHARE]
    if not keep:
        n, why = best_score()
        return n, f"no trial on the front keeps {RETAIN_SHARE:.0%} of retain; {why}"
    t = min(
        keep,
        key=lambda t: (t["outcome"]["forget_gap"], -t["outcome"]["retain_kept"], t["number"]),
    )
    o = t["outcome"]
    return t["number"], (
        f"closest to gold on forget (gap {o['forget_gap']:.3f}) among front trials keeping "
        f">= {RETAIN_SHARE:.0%} of retain (kept {o['retain_kept']:.3f})"
    )
