"""Forget requests one after another: 4 requests, every demo method, one seed.

    .venv/bin/python benchmarks/sequential.py [--ranks 2] [--requests P012 P015 P003 P007]

One `dsunlearn unlearn --config configs/demo.yaml requests=[[P012],[P015],[P003],[P007]]` run
on the built-in benchmark (seed 0, its shipped vanilla and gold models) through the deepspeed
launcher: each request forgets one person, from each method's selected weights after the
previous request. The gold model never saw P012 and P015 (the data's forget split): its rows
are exact for requests 1-2 and approximate for 3-4 (recipes/requests.py says how).

Writes benchmarks/results/sequential.json (the report's `requests` section, wall time,
machine), copies the run's requests.png to benchmarks/plots/sequential.png and prints the
markdown tables for RESULTS.md: per method, forget VQA on everyone forgotten so far, its gap to
gold, retain VQA and forget text QA after each request.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from quality_runs import REPO, run_unlearn, write_result

COLUMNS = (
    ("forget VQA (all forgotten so far)", "forget_vqa_acc"),
    ("retain VQA", "retain_vqa_acc"),
    ("forget text QA", "forget_text_qa_acc"),
    ("retain text QA", "retain_text_qa_acc"),
)


def table(requests: list[dict], title: str, key: str, gap: bool = False) -> str:
    """One row per method (and vanilla, gold), one column per request."""
    head = " | ".join(f"r{r['index']} (+{', '.join(r['people'])})" for r in requests)
    lines = [f"\n{title}:\n", f"| row | {head} |", "|---|" + "---|" * len(requests)]
    rows = ["vanilla", "gold", *requests[-1]["methods"]]
    for name in rows:
        cells = []
        for r in requests:
            if gap:
                v = r.get("vs_gold", {}).get(name, {}).get("gap", {}).get(key)
            elif name in ("vanilla", "gold"):
                v = r.get(name, {}).get(key)
            else:
                v = r["methods"][name].get(key)
            cells.append("" if v is None else f"{v:+.3f}" if gap else f"{v:.3f}")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--requests", nargs="+", default=["P012", "P015", "P003", "P007"])
    args = ap.parse_args()
    requests = "[" + ",".join(f"[{p}]" for p in args.requests) + "]"
    cli = ["--config", "configs/demo.yaml", f"requests={requests}", "report_to=[]"]
    with tempfile.TemporaryDirectory() as tmp:
        report, wall = run_unlearn(args.ranks, cli, Path(tmp), "sequential")
        plots = REPO / "benchmarks" / "plots"
        plots.mkdir(exist_ok=True)
        shutil.copy(Path(tmp) / "sequential" / "requests.png", plots / "sequential.png")
    seq = report["requests"]
    path = write_result(
        "sequential",
        f"benchmarks/sequential.py --ranks {args.ranks} --requests {' '.join(args.requests)}",
        args.ranks,
        {"requests_override": f"requests={requests}", "wall_s": wall, "requests": seq},
    )
    print(f"wall {wall} s")
    print(
        table(
            seq,
            "gap to gold, forget VQA (gold row: "
            + ", ".join(f"r{r['index']} {r.get('gold_row', 'none')}" for r in seq)
            + ")",
            "forget_vqa_acc",
            True,
        )
    )
    for title, key in COLUMNS:
        print(table(seq, title, key))
    overlaps = [r.get("mask_overlap", {}).get("mmunlearner") for r in seq]
    print("\nMMUnlearner mask overlap with the previous request:")
    for r, o in zip(seq, overlaps, strict=True):
        if o:
            print(f"- r{r['index']}: Jaccard {o['jaccard']:.3f}, keeps {o['kept_share']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
