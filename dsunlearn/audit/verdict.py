"""From the attacks' figures to one verdict per attack: is the model, attacked, any closer to
the vanilla model than gold is under the same attack?

For the attacks that act on a model (relearning, quantization, rephrased images):
- "not forgotten": before the attack, the model is already more than `margin` above gold;
- "hidden": it was within `margin` of gold, and the attack lifts it more than `margin` above
  gold's attacked figure: the knowledge was suppressed, not removed;
- "removed": within `margin` of gold before and after.
For the readers of what is inside (identity probe, membership inference): "readable" when the
model's figure is more than `margin` above gold's, else "like gold".
"""

from __future__ import annotations

import math
from typing import Any

RELEARN_AT = 20  # the step the quality table reports (the nearest measured one if absent)


def _gap(model: float, gold: float) -> float:
    return float(model) - float(gold)


def _status(before: float, after: dict[str, float], margin: float) -> tuple[str, str]:
    worst = max(after, key=lambda k: after[k]) if after else None
    if before > margin:
        return "not forgotten", f"{before:+.3f} above gold before any attack"
    if worst is not None and after[worst] > margin:
        return "hidden", f"{after[worst]:+.3f} above gold after {worst} (before: {before:+.3f})"
    top = f"; at most {after[worst]:+.3f} after {worst}" if worst else ""
    return "removed", f"within {margin} of gold (before: {before:+.3f}{top})"


def relearn_at(result: dict[str, Any], key: str, step: int = RELEARN_AT) -> float:
    """The curve's value at `step`, or at the measured step nearest to it."""
    steps = result["steps"]
    i = min(range(len(steps)), key=lambda j: (abs(steps[j] - step), steps[j]))
    return float(result[key][i])


def judge_relearn(res: dict[str, dict], margin: float) -> dict[str, Any]:
    m, g = res["model"], res["gold"]
    after = {
        f"{k} steps ({key})": _gap(m[key][i], g[key][i])
        for key in ("forget_facts", "forget_heldout_facts")
        for i, k in enumerate(m["steps"])
        if k > 0
    }
    status, why = _status(_gap(m["forget_facts"][0], g["forget_facts"][0]), after, margin)
    return {
        "status": status,
        "why": why,
        "recovery_vs_gold": _gap(
            relearn_at(m, "forget_facts") - m["forget_facts"][0],
            relearn_at(g, "forget_facts") - g["forget_facts"][0],
        ),
        "gap_at_step": _gap(relearn_at(m, "forget_facts"), relearn_at(g, "forget_facts")),
    }


def judge_quant(res: dict[str, dict], margin: float) -> dict[str, Any]:
    m, g = res["model"], res["gold"]
    schemes = [k for k in m if k.startswith("int")]
    after = {k: _gap(m[k]["forget_vqa"], g[k]["forget_vqa"]) for k in schemes}
    status, why = _status(_gap(m["none"]["forget_vqa"], g["none"]["forget_vqa"]), after, margin)
    return {"status": status, "why": why, **{f"{k}_gap": v for k, v in after.items()}}


def judge_rephrase(res: dict[str, dict], margin: float) -> dict[str, Any]:
    m, g = res["model"], res["gold"]
    after = {
        k: _gap(m[k], g[k])
        for k in m
        if k != "original" and not (math.isnan(m[k]) or math.isnan(g[k]))
    }
    status, why = _status(_gap(m["original"], g["original"]), after, margin)
    return {"status": status, "why": why, **{f"{k}_gap": v for k, v in after.items()}}


def judge_probe(res: dict[str, dict], margin: float) -> dict[str, Any]:
    m, g = res["model"], res["gold"]
    gaps = {
        layer: _gap(m[layer]["forget_heldout"], g[layer]["forget_heldout"])
        for layer in ("middle", "last")
    }
    layer = max(gaps, key=lambda k: gaps[k])
    if gaps[layer] > margin:
        return {"status": "readable", "why": f"{layer} layer {gaps[layer]:+.3f} above gold", **gaps}
    return {"status": "like gold", "why": f"at most {gaps[layer]:+.3f} above gold", **gaps}


def judge_mia(res: dict[str, dict], margin: float) -> dict[str, Any]:
    m, g = res["model"], res["gold"]
    stats = [k for k in m if isinstance(m[k], dict)]
    gaps = {k: _gap(m[k]["auc"], g[k]["auc"]) for k in stats}
    worst = max(gaps, key=lambda k: gaps[k])
    if gaps[worst] > margin:
        return {"status": "readable", "why": f"{worst} AUC {gaps[worst]:+.3f} above gold", **gaps}
    return {"status": "like gold", "why": f"AUC at most {gaps[worst]:+.3f} above gold", **gaps}


JUDGES = {
    "relearn": judge_relearn,
    "quant": judge_quant,
    "probe": judge_probe,
    "rephrase": judge_rephrase,
    "mia": judge_mia,
}


def audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
    """What a run report keeps of a method's audit: each attack's verdict, and the two figures
    the quality table shows (relearning recovery at RELEARN_AT steps and int4 forget VQA, each
    relative to gold's under the same attack)."""
    attacks = audit["attacks"]
    out: dict[str, Any] = {"verdicts": {k: a["verdict"]["status"] for k, a in attacks.items()}}
    if "relearn" in attacks:
        out["relearn_recovery_vs_gold"] = attacks["relearn"]["verdict"]["recovery_vs_gold"]
    if "quant" in attacks and "int4_gap" in attacks["quant"]["verdict"]:
        out["int4_forget_vs_gold"] = attacks["quant"]["verdict"]["int4_gap"]
    return out
