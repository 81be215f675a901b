"""The report's section on sequential requests (`unlearn requests=[...]`, report.json's
`requests`): each metric against the request index, one line per method.

Each entry of `requests` holds one request's test rows (recipes/unlearn.py `request_summary`):
who it forgot, everyone forgotten so far, the vanilla, gold and method rows on those people, the
verdicts against gold (`gold_row`: exact or approximate, recipes/requests.py says why), each
method's selected step and MMUnlearner's mask overlap with the previous request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsunlearn.fsutil import atomic_path

# What the section draws, where the protocol has it (the built-in one's names first); any
# other protocol's metrics common to every request stand in, up to MAX_PANELS.
PREFERRED = (
    "forget_vqa_acc",
    "forget_heldout_vqa_acc",
    "retain_vqa_acc",
    "forget_text_qa_acc",
    "retain_text_qa_acc",
)
MAX_PANELS = 6
QUALITY = "forget quality (p)"
GAP = "gap to gold"


def _series(report: dict[str, Any]) -> dict[str, dict[str, list[float | None]]]:
    """metric -> row name (gold, methods) -> its value after each request."""
    reqs = report["requests"]
    common = set.intersection(*(set(m) for r in reqs for m in r["methods"].values()))
    metrics = [k for k in PREFERRED if k in common] or sorted(common)[:MAX_PANELS]
    forget_key = metrics[0] if metrics else None
    rows = ["vanilla", "gold", *reqs[-1]["methods"]]
    out: dict[str, dict[str, list[float | None]]] = {}
    for key in metrics:
        values = {n: [_row(r, n).get(key) for r in reqs] for n in rows}
        out[key] = {n: v for n, v in values.items() if any(x is not None for x in v)}
    if any("vs_gold" in r for r in reqs):
        out[QUALITY] = {
            n: [
                r.get("vs_gold", {}).get(n, {}).get("forget_quality", {}).get("p_value")
                for r in reqs
            ]
            for n in rows[2:]
        }
        out[f"{GAP} ({forget_key})"] = {
            n: [r.get("vs_gold", {}).get(n, {}).get("gap", {}).get(forget_key) for r in reqs]
            for n in rows[2:]
        }
    return out


def _row(entry: dict[str, Any], name: str) -> dict[str, float]:
    if name in ("vanilla", "gold"):
        return entry.get(name, {})
    return entry["methods"].get(name, {})


def requests_markdown(report: dict[str, Any]) -> str:
    """Who each request forgot, then one table per metric: rows = vanilla, gold, the methods,
    columns = after request 1, 2, ...; "" without requests."""
    reqs = report.get("requests")
    if not reqs:
        return ""
    text = (
        "\n## Requests, one after another\n\nEach request unlearns its people from the "
        "previous request's selected weights; every row is scored on everyone forgotten so "
        "far (forget) and on the retain people no request names (retain). The table above is "
        "the state after the last request (requests.png draws these tables).\n\n"
        "| request | forgets | forgotten so far | gold row | MMUnlearner mask overlap |\n"
        "|---|---|---|---|---|\n"
    )
    for r in reqs:
        overlap = r.get("mask_overlap", {}).get("mmunlearner")
        shown = (
            f"Jaccard {overlap['jaccard']:.3f}, keeps {overlap['kept_share']:.3f}"
            if overlap
            else ""
        )
        text += (
            f"| {r['index']} | {', '.join(r['people'])} | {len(r['forgotten'])} | "
            f"{r.get('gold_row', 'none')} | {shown} |\n"
        )
    for key, rows in _series(report).items():
        text += f"\n{key}:\n\n| row | " + " | ".join(f"r{r['index']}" for r in reqs) + " |\n"
        text += "|---|" + "---|" * len(reqs) + "\n"
        for name, values in rows.items():
            cells = ["" if v is None else f"{v:.3f}" for v in values]
            text += f"| {name} | " + " | ".join(cells) + " |\n"
    return text


def row_colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every panel (the gap and quality panels have no
    vanilla or gold line: colours by position would shift there); tab20 past 10 methods."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(methods)}


def plot_requests(report: dict[str, Any], path: Path) -> None:
    """One panel per metric, the request index on x, one line per method, vanilla dashed and
    gold dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(report)
    xs = [r["index"] for r in report["requests"]]
    colors = row_colors(list(report["requests"][-1]["methods"]))
    cols = min(3, max(1, len(series)))
    nrows = -(-len(series) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, rows) in zip(axes.flat, series.items(), strict=False):
        for name, values in rows.items():
            pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            if not pts:
                continue
            style = {"color": colors.get(name, "grey")}
            if name in ("vanilla", "gold"):  # the references: black, dashed and dotted
                style = {"color": "black", "linestyle": "--" if name == "vanilla" else ":"}
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name, **style)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("request", fontsize=8)
        ax.set_xticks(xs)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("after each request (test split)", fontsize=10)
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
