"""The run report: report.json (the contract), report.md (a table) and report.png (a chart).

All three are written atomically: a crash leaves the previous report intact or none at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dsunlearn.fsutil import atomic_path, write_json_atomic, write_text_atomic

REQUIRED_KEYS = ("vanilla", "methods", "chance", "world_size", "elapsed_s")


def validate_report(report: dict[str, Any]) -> None:
    """Raise ValueError unless `report` has the documented shape."""
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"report is missing keys: {missing}")
    if not isinstance(report["vanilla"], dict) or not isinstance(report["methods"], dict):
        raise ValueError("report 'vanilla' and 'methods' must be mappings")
    for name, metrics in [("vanilla", report["vanilla"]), *report["methods"].items()]:
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                raise ValueError(f"report metric {name}.{key} is not a number: {value!r}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def report_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per model (vanilla first), one column per metric."""
    rows = {"vanilla": report["vanilla"], **report["methods"]}
    metrics: list[str] = []
    for m in rows.values():
        metrics += [k for k in m if k not in metrics]
    lines = [
        "| model | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k, "")) for k in metrics) + " |")
    return "\n".join(lines)


def report_markdown(report: dict[str, Any], title: str) -> str:
    return (
        f"# {title}\n\n"
        f"World size {report['world_size']}, {report['elapsed_s']:.1f} s, "
        f"multiple-choice chance {report['chance']}.\n\n" + report_table(report) + "\n"
    )


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: for each metric, vanilla and every method side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"vanilla": report["vanilla"], **report["methods"]}
    metrics = [k for k in report["vanilla"] if isinstance(report["vanilla"][k], (int, float))]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(metrics) + 1.5), 4.0))
    for i, (name, m) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [m.get(k, 0.0) for k in metrics], width=width, label=name)
    ax.axhline(report["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(run_dir: str | Path, report: dict[str, Any], title: str = "dsunlearn report"):
    """Write report.json, report.md and report.png into `run_dir`; returns the json path."""
    validate_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_report(report, run_dir / "report.png")
    write_text_atomic(run_dir / "report.md", report_markdown(report, title))
    write_json_atomic(run_dir / "report.json", report)  # last: its presence means complete
    return run_dir / "report.json"
