"""audit.md and audit.png from audit.json: one table per attack (model, gold, vanilla side by
side) with its verdict, and the relearning curves against gold's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ROLES = ("model", "gold", "vanilla")


def _f(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _relearn(a: dict[str, Any]) -> str:
    steps = a["model"]["steps"]
    rows = [
        [f"{role}: {key}", *a[role][key]]
        for key in ("forget_facts", "forget_heldout_facts")
        for role in ROLES
    ]
    return _table(["forget VQA (other facts) after k steps", *map(str, steps)], rows)


def _quant(a: dict[str, Any]) -> str:
    schemes = [k for k in a["model"] if k == "none" or k.startswith("int")]
    rows = [
        [f"{role}: {metric}", *(a[role][s][metric] for s in schemes)]
        for metric in ("forget_vqa", "retain_vqa")
        for role in ROLES
    ]
    return _table(["accuracy", *schemes], rows)


def _rephrase(a: dict[str, Any]) -> str:
    views = list(a["model"])
    return _table(["forget VQA", *views], [[r, *(a[r][v] for v in views)] for r in ROLES])


def _probe(a: dict[str, Any]) -> str:
    rows = [
        [
            f"{role}: {layer} layer",
            a[role][layer]["forget_heldout"],
            a[role][layer]["retain_heldout"],
        ]
        for layer in ("middle", "last")
        for role in ROLES
    ]
    chance = a["model"]["chance"]
    head = ["identity probe accuracy", "forget held-out", "retain held-out"]
    return _table(head, rows) + f"\n\nChance: {chance:.3f}; items: {a['model']['n']}."


def _mia(a: dict[str, Any]) -> str:
    stats = [k for k in a["model"] if isinstance(a["model"][k], dict)]
    fpr = a["model"]["fpr"]
    rows = [
        [role, *(v for s in stats for v in (a[role][s]["auc"], a[role][s]["tpr_at_fpr"]))]
        for role in ROLES
    ]
    head = ["model", *(h for s in stats for h in (f"{s} AUC", f"{s} TPR@{fpr:g}"))]
    m = a["model"]
    return _table(head, rows) + f"\n\nMembers {m['members']}, non-members {m['nonmembers']}."


TABLES = {
    "relearn": ("Relearning", _relearn),
    "quant": ("Quantization (weight-only, round to nearest)", _quant),
    "probe": ("Identity probe", _probe),
    "rephrase": ("Rephrased images", _rephrase),
    "mia": ("Membership inference", _mia),
}


def audit_markdown(audit: dict[str, Any]) -> str:
    m = audit["models"]
    out = [
        f"# dsunlearn audit: {m['model']}",
        "",
        f"Gold: {m['gold']}; vanilla: {m['vanilla']}; benchmark {audit['benchmark']['name']} "
        f"({audit['benchmark']['data']}); {audit['world_size']} rank(s); "
        f"margin {audit['settings']['margin']}.",
        "",
        "| attack | verdict | why |",
        "|---|---|---|",
    ]
    out += [
        f"| {name} | **{a['verdict']['status']}** | {a['verdict']['why']} |"
        for name, a in audit["attacks"].items()
    ]
    for name, a in audit["attacks"].items():
        title, table = TABLES[name]
        out += ["", f"## {title}", "", table(a)]
    return "\n".join(out) + "\n"


def plot_audit(audit: dict[str, Any], path: Path) -> None:
    """Relearning curves (model, gold, vanilla) and each other attack's forget figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = audit["attacks"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"model": "tab:red", "gold": "tab:olive", "vanilla": "tab:blue"}
    ax = axes[0]
    if "relearn" in attacks:
        for role in ROLES:
            r = attacks["relearn"][role]
            ax.plot(r["steps"], r["forget_facts"], "-o", c=colours[role], label=f"{role}")
            ax.plot(r["steps"], r["forget_heldout_facts"], "--", c=colours[role], alpha=0.6)
        ax.set_xlabel("relearning steps")
        ax.set_ylabel("forget VQA, other facts (dashed: held-out images)")
        ax.legend()
    ax.set_title("relearning")
    ax = axes[1]
    bars: dict[str, dict[str, float]] = {role: {} for role in ROLES}
    for role in ROLES:
        if "quant" in attacks:
            for k, v in attacks["quant"][role].items():
                if k.startswith("int"):
                    bars[role][f"{k} forget"] = v["forget_vqa"]
        if "rephrase" in attacks:
            for k, v in attacks["rephrase"][role].items():
                bars[role][k] = v
        if "probe" in attacks:
            bars[role]["probe (last)"] = attacks["probe"][role]["last"]["forget_heldout"]
        if "mia" in attacks:
            bars[role]["min-k AUC"] = attacks["mia"][role]["mink"]["auc"]
    names = list(bars["model"])
    width = 0.27
    for j, role in enumerate(ROLES):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(
            xs, [bars[role].get(n, math.nan) for n in names], width, color=colours[role], label=role
        )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("attacked forget figures")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the path may be a temporary name
    plt.close(fig)
