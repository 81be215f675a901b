"""The run report: report.json (the contract), report.md (a table) and report.png (a chart).

All three are written atomically: a crash leaves the previous report intact or none at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dsunlearn.fsutil import atomic_path, write_json_atomic, write_text_atomic
from dsunlearn.report_requests import plot_requests, requests_markdown

REQUIRED_KEYS = ("vanilla", "methods", "chance", "world_size", "elapsed_s")
# method_info: method name -> facts about its run (e.g. SIU's images); benchmark: which
# benchmark and protocol scored the rows ({"name": ..., "split_rule": ..., ...}); judge: the
# jailbreak judge; vanilla_model: the unlearned model's folder or hub id; gold: the gold
# model's row (gold_model: its folder); vs_gold: row name ->
# {"forget_quality": {p_value, ks_statistic, n, ...}, "gap": {metric: row - gold}}; val: the
# reference rows on the validation split; curves: method -> [{"step": N, metric: value}] on the
# validation split; selection: method -> the selected step and why; timing: method -> seconds;
# requests: one entry per sequential request (report_requests.py).
OPTIONAL_KEYS = (
    "method_info",
    "vanilla_model",
    "benchmark",
    "judge",
    "gold",
    "gold_model",
    "vs_gold",
    "val",
    "curves",
    "selection",
    "timing",
    "resumed",
    "requests",
    "utility",
)
# Metrics that are not scores in [0, 1] (flu is a perplexity, >= 1, lower is better): the chart
# draws them in a panel of their own. Any other metric with a value outside [0, 1] goes there too.
UNBOUNDED_METRICS = ("flu",)


def validate_report(report: dict[str, Any]) -> None:
    """Raise ValueError unless `report` has the documented shape."""
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"report is missing keys: {missing}")
    if not isinstance(report["vanilla"], dict) or not isinstance(report["methods"], dict):
        raise ValueError("report 'vanilla' and 'methods' must be mappings")
    for name, metrics in _rows(report).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                raise ValueError(f"report metric {name}.{key} is not a number: {value!r}")
    for name, verdict in report.get("vs_gold", {}).items():
        if not isinstance(verdict, dict) or not isinstance(verdict.get("gap", {}), dict):
            raise ValueError(f"report vs_gold.{name} must be a mapping with a 'gap' mapping")
    for name, curve in report.get("curves", {}).items():
        if not isinstance(curve, list) or not all("step" in point for point in curve):
            raise ValueError(f"report curves.{name} must be a list of points with a 'step'")
    bench = report.get("benchmark", {"name": ""})
    if not isinstance(bench, dict) or not isinstance(bench.get("name"), str):
        raise ValueError("report 'benchmark' must be a mapping with a string 'name'")
    if not isinstance(report.get("judge", ""), str):
        raise ValueError("report 'judge' must be a string")
    info = report.get("method_info", {})
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise ValueError("report 'method_info' must map method names to mappings")
    for name, facts in info.items():
        images = facts.get("images", [])
        if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
            raise ValueError(f"report method_info.{name}.images must be a list of mappings")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


# Beyond this many metrics (MLLMU-Bench's protocol has ~40) a row per model is unreadable:
# the table turns to one row per metric, one column per model.
MAX_METRIC_COLUMNS = 16


def _rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every model's row: vanilla, gold (when the report has one), then the methods."""
    gold = {"gold": report["gold"]} if "gold" in report else {}
    return {"vanilla": report["vanilla"], **gold, **report["methods"]}


def report_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per model (vanilla, gold, then the methods), one column per
    metric; transposed past `MAX_METRIC_COLUMNS` metrics, without an empty vanilla column."""
    return markdown_table(_rows(report))


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """One row per model, one column per metric; one row per metric past
    `MAX_METRIC_COLUMNS` metrics (an empty vanilla row is left out then)."""
    metrics: list[str] = []
    for m in rows.values():
        metrics += [k for k in m if k not in metrics]
    if len(metrics) > MAX_METRIC_COLUMNS:
        models = [name for name, m in rows.items() if m or name != "vanilla"]
        lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
        for k in metrics:
            lines.append(f"| {k} | " + " | ".join(_fmt(rows[n].get(k, "")) for n in models) + " |")
        return "\n".join(lines)
    lines = [
        "| model | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k, "")) for k in metrics) + " |")
    return "\n".join(lines)


IMAGE_COLUMNS = ("entity_id", "name", "image_index", "sha256")


def images_table(report: dict[str, Any]) -> str:
    """A markdown table of the images each method saw (`method_info[m]["images"]`); "" if none."""
    rows = [
        (method, image)
        for method, facts in report.get("method_info", {}).items()
        for image in facts.get("images", [])
    ]
    if not rows:
        return ""
    lines = [
        "| method | " + " | ".join(IMAGE_COLUMNS) + " |",
        "|---|" + "---|" * len(IMAGE_COLUMNS),
    ]
    for method, image in rows:
        lines.append(
            f"| {method} | " + " | ".join(str(image.get(k, "")) for k in IMAGE_COLUMNS) + " |"
        )
    return "\n".join(lines)


def report_markdown(report: dict[str, Any], title: str) -> str:
    text = (
        f"# {title}\n\n"
        f"World size {report['world_size']}, {report['elapsed_s']:.1f} s, "
        f"multiple-choice chance {report['chance']}.\n\n"
    )
    if "benchmark" in report:
        text += f"Benchmark: {report['benchmark']['name']}"
        if "judge" in report:
            text += f"; jailbreak judge: {report['judge']}"
        text += ".\n\n"
        for note in report["benchmark"].get("notes", []):
            text += f"- {note}\n"
        for key, why in report["benchmark"].get("omitted", {}).items():
            text += f"- not computed: {key} ({why})\n"
        if report["benchmark"].get("notes") or report["benchmark"].get("omitted"):
            text += "\n"
    rule = report.get("benchmark", {}).get("split_rule")
    if rule:
        text += f"Validation / test split: {rule}.\n\n"
    text += report_table(report) + "\n"
    text += utility_markdown(report)
    verdicts = gold_table(report)
    if verdicts:
        text += (
            "\n## Against the gold model\n\nForget quality: the KS-test p-value between the "
            "row's and the gold model's truth ratios over the forget items (n items; high = "
            "indistinguishable from a model that never saw the forget pictures). Gap: the row "
            "minus gold.\n\n" + verdicts + "\n"
        )
    selection = selection_table(report)
    if selection:
        text += (
            "\n## Selected steps\n\nChosen on the validation split only; the table above is "
            "the test split at these steps (curves: curves.png).\n\n" + selection + "\n"
        )
    images = images_table(report)
    if images:
        text += "\n## SIU images\n\nThe one training image each method fine-tuned on.\n\n"
        text += images + "\n"
    text += requests_markdown(report)
    audits = audit_table(report)
    if audits:
        text += (
            "\n## Audit\n\nEach method's selected weights under `dsunlearn audit`'s attacks, "
            "against the gold model under the same attacks (audit/<method>/audit.md has the "
            "figures). Relearning: the rise of forget VQA over 20 relearning steps minus gold's; "
            "int4: forget VQA after int4 quantization minus gold's.\n\n" + audits + "\n"
        )
    return text


def utility_markdown(report: dict[str, Any]) -> str:
    """Where the general-ability columns (pope_*, mmbench_*) came from and what they mean."""
    facts = report.get("utility")
    if not facts:
        return ""
    text = "\nGeneral ability (`eval.utility`): " + facts["note"] + "\n\n"
    for name, f in facts.items():
        if name == "note":
            continue
        where = "the built-in fixture" if f.get("builtin_fixture") else "data"
        n = f.get("questions", 0)
        n = sum(n.values()) if isinstance(n, dict) else n  # POPE: per question file
        text += f"- {name}: {n} questions, chance {f.get('chance')}, {where} {f['data']}\n"
    return text


def audit_table(report: dict[str, Any]) -> str:
    """Each audited method's verdicts and the two relative figures; "" without an audit."""
    audits = report.get("audit", {})
    if not audits:
        return ""
    attacks = sorted({a for s in audits.values() for a in s.get("verdicts", {})})
    head = ["method", *attacks, "relearning vs gold", "int4 forget vs gold"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in audits.items():
        cells = [s["verdicts"].get(a, "—") for a in attacks]
        cells += [_fmt(s.get("relearn_recovery_vs_gold")), _fmt(s.get("int4_forget_vs_gold"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gold_table(report: dict[str, Any]) -> str:
    """Forget quality and the gaps to gold of every row, as a markdown table; "" without gold."""
    rows: dict[str, dict[str, Any]] = {}
    for name, verdict in report.get("vs_gold", {}).items():
        q = verdict.get("forget_quality", {})
        row: dict[str, Any] = {}
        if q:
            row.update({"forget_quality": q["p_value"], "ks": q["ks_statistic"], "n": q["n"]})
            row["median_truth_ratio"] = q["median_truth_ratio"]
        row.update({f"gap {k}": v for k, v in verdict.get("gap", {}).items()})
        rows[name] = row
    return markdown_table({"vanilla": {}, **rows}) if rows else ""


def selection_table(report: dict[str, Any]) -> str:
    """Per method: the rule, the selected step, the steps run and why; "" when none."""
    sel = report.get("selection", {})
    if not any(
        s.get("criterion") not in (None, "last") or s.get("steps_run") for s in sel.values()
    ):
        return ""
    lines = ["| method | criterion | selected step | steps run | reason |", "|---|---|---|---|---|"]
    for name, s in sel.items():
        run = f"{s.get('steps_run', s.get('step'))}" + (
            " (early stop)" if s.get("early_stopped") else ""
        )
        lines.append(
            f"| {name} | {s.get('criterion')} | {s.get('step')} | {run} | {s.get('reason', '')} |"
        )
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """The validation curves: one panel per metric, one line per method, the vanilla and gold
    models' validation values as dashed lines, each method's selected step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {m: c for m, c in report.get("curves", {}).items() if c}
    metrics: list[str] = []
    for c in curves.values():
        metrics += [k for k in c[0] if k != "step" and k not in metrics]
    cols = min(3, max(1, len(metrics)))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    refs = report.get("val", {})
    for ax, key in zip(axes.flat, metrics, strict=False):
        for i, (method, curve) in enumerate(curves.items()):
            xs = [p["step"] for p in curve if key in p]
            ax.plot(
                xs,
                [p[key] for p in curve if key in p],
                marker="o",
                ms=3,
                color=f"C{i}",
                label=method,
            )
            chosen = report.get("selection", {}).get(method, {}).get("step")
            hit = [p[key] for p in curve if p["step"] == chosen and key in p]
            if hit:
                ax.plot([chosen], hit, marker="*", ms=11, color=f"C{i}")
        for ref, style in (("vanilla", "--"), ("gold", ":")):
            if key in refs.get(ref, {}):
                ax.axhline(refs[ref][key], color="black", linestyle=style, linewidth=1, label=ref)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper right")
    fig.suptitle("validation curves (star: selected step)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _is_unbounded(name: str, values: list[float]) -> bool:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return name in UNBOUNDED_METRICS or any(v < 0 or v > 1 for v in finite)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: for each metric, vanilla and every method side by side.

    Scores in [0, 1] share one axis; unbounded metrics (flu, a perplexity) get a panel of their
    own on a log axis with the values written on the bars, so they do not squash the scores.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(report)
    metrics: list[str] = []
    for m in rows.values():
        metrics += [k for k in m if k not in metrics and isinstance(m[k], (int, float))]
    wide = [k for k in metrics if _is_unbounded(k, [m.get(k) for m in rows.values()])]
    unit = [k for k in metrics if k not in wide]
    if len(metrics) > MAX_METRIC_COLUMNS:
        _plot_many(report, rows, unit, wide, path)
        return
    width = 0.8 / max(1, len(rows))
    panels = [unit] + ([wide] if wide else [])
    ratios = [max(1, len(p)) for p in panels]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(max(6.0, 1.4 * len(metrics) + 2.5), 4.0),
        gridspec_kw={"width_ratios": ratios},
        squeeze=False,
    )
    ax = axes[0][0]
    for i, (name, m) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(unit))]
        ax.bar(xs, [m.get(k, 0.0) for k in unit], width=width, label=name)
    ax.axhline(report["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(unit))])
    ax.set_xticklabels(unit, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    if wide:
        wx = axes[0][1]
        positive = []
        for i, m in enumerate(rows.values()):
            xs = [j + i * width for j in range(len(wide))]
            ys = [m.get(k, math.nan) for k in wide]
            ys = [
                y if isinstance(y, (int, float)) and math.isfinite(y) and y > 0 else math.nan
                for y in ys
            ]
            bars = wx.bar(xs, ys, width=width, color=f"C{i}")
            labels = ["" if math.isnan(y) else f"{y:.3g}" for y in ys]
            wx.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
            positive += [y for y in ys if not math.isnan(y)]
        if positive:
            wx.set_yscale("log")
            wx.set_ylim(min(1.0, min(positive)) * 0.9, max(positive) * 4)
        wx.set_xticks([j + 0.4 - width / 2 for j in range(len(wide))])
        wx.set_xticklabels(wide, rotation=30, ha="right", fontsize=8)
        only_flu = wide == ["flu"]
        wx.set_ylabel("flu: perplexity, lower is better" if only_flu else "value", fontsize=8)
    axes[0][-1].legend(
        *ax.get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0)
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _plot_many(
    report: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    unit: list[str],
    wide: list[str],
    path: Path,
) -> None:
    """Past `MAX_METRIC_COLUMNS` metrics: horizontal bars, one metric per line (top to bottom in
    report order), so that the figure grows in height and every name stays readable. Unbounded
    metrics get a log-scaled panel below; an empty vanilla row is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: m for n, m in rows.items() if m or n != "vanilla"}
    panels = [(unit, False)] + ([(wide, True)] if wide else [])
    height = 0.22 * len(rows)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(8.0, 1.2 + sum(max(1, len(p)) * max(0.3, height) for p, _ in panels)),
        gridspec_kw={"height_ratios": [max(1, len(p)) for p, _ in panels]},
        squeeze=False,
    )
    bar = 0.8 / max(1, len(rows))
    for ax, (names, log) in zip(axes[:, 0], panels, strict=True):
        for i, (label, m) in enumerate(rows.items()):
            ys = [j + i * bar for j in range(len(names))]
            xs = [m.get(k, math.nan) for k in names]
            xs = [x if isinstance(x, (int, float)) and math.isfinite(x) else math.nan for x in xs]
            ax.barh(ys, xs, height=bar, color=f"C{i}", label=label)
        ax.set_yticks([j + 0.4 - bar / 2 for j in range(len(names))])
        ax.set_yticklabels(names, fontsize=7)
        ax.set_ylim(len(names) - 0.1, -bar / 2 - 0.1)  # first metric on top, no margins
        ax.grid(axis="x", alpha=0.3)
        if log:
            ax.set_xscale("log")
            ax.set_xlabel("value (log)", fontsize=8)
        else:
            ax.axvline(report["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
            ax.set_xlim(0, 1.05)
            ax.set_xlabel("score", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(run_dir: str | Path, report: dict[str, Any], title: str = "dsunlearn report"):
    """Write report.json, report.md and report.png into `run_dir`; returns the json path."""
    validate_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plot_report(report, run_dir / "report.png")
    if any(report.get("curves", {}).values()):
        plot_curves(report, run_dir / "curves.png")
    if report.get("requests"):
        plot_requests(report, run_dir / "requests.png")
    write_text_atomic(run_dir / "report.md", report_markdown(report, title))
    write_json_atomic(run_dir / "report.json", report)  # last: its presence means complete
    return run_dir / "report.json"
