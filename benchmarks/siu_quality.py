"""SIU on the built-in benchmark: its metrics against the issue's quality targets, per setting.

    .venv/bin/python benchmarks/siu_quality.py [--ranks 2] [--quick]

Runs `dsunlearn unlearn --config configs/demo.yaml methods=[siu]` through the deepspeed
launcher once per setting (the paper's defaults first, then stronger learning rates / more
steps), all forget people (2 of 20) together, and checks each run against:

    gen >= 0.9                                  (held-out images: the name is gone)
    forget_heldout_vqa_acc <= chance + 0.1      (held-out images: the facts are gone)
    retain_vqa_acc >= 0.95 x vanilla            (other people's faces are kept)
    forget_text_qa_acc >= 0.9 x vanilla         (the forgotten people's facts, asked by name)

Writes benchmarks/results/siu_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from quality_runs import finish, run_unlearn

# (label, overrides); the first is SIU's paper defaults (the demo's setting).
SETTINGS: list[tuple[str, list[str]]] = [
    ("paper defaults: lr 3e-4, 6 steps/person, a=b=1", []),
    ("paper text a=0.9, b=0.75", ["method.siu_alpha=0.9", "method.siu_beta=0.75"]),
    ("lr 3e-4, 12 steps/person", ["method.siu_steps=12"]),
    ("lr 3e-4, 6 steps/person, augmented views", ["method.siu_augment=true"]),
    ("lr 5e-4, 6 steps/person", ["method.siu_lr=5e-4"]),
    ("lr 1e-3, 6 steps/person", ["method.siu_lr=1e-3"]),
    ("LoRA r=8 (the paper's setting), lr 3e-4", ["peft.lora.r=8"]),
    ("LoRA r=8, lr 2e-3", ["peft.lora.r=8", "method.siu_lr=2e-3"]),
    ("LoRA r=8, lr 5e-3", ["peft.lora.r=8", "method.siu_lr=5e-3"]),
]
METRICS = (
    "eff",
    "gen",
    "forget_heldout_vqa_acc",
    "forget_vqa_acc",
    "retain_vqa_acc",
    "retain_heldout_vqa_acc",
    "forget_text_qa_acc",
    "retain_text_qa_acc",
    "flu",
    "div",
)


def targets(m: dict[str, float], vanilla: dict[str, float], chance: float) -> dict[str, bool]:
    return {
        "gen>=0.9": m["gen"] >= 0.9,
        "forget_heldout<=chance+0.1": m["forget_heldout_vqa_acc"] <= chance + 0.1,
        "retain_vqa>=0.95xvanilla": m["retain_vqa_acc"] >= 0.95 * vanilla["retain_vqa_acc"],
        "forget_text>=0.9xvanilla": m["forget_text_qa_acc"] >= 0.9 * vanilla["forget_text_qa_acc"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the paper defaults")
    args = ap.parse_args()
    settings = SETTINGS[:1] if args.quick else SETTINGS
    rows, vanilla, chance = [], None, 0.25
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, overrides) in enumerate(settings):
            cli = ["--config", "configs/demo.yaml", "methods=[siu]", *overrides]
            report, wall_s = run_unlearn(args.ranks, cli, Path(tmp), f"s{k}")
            vanilla, chance = report["vanilla"], report["chance"]
            m = report["methods"]["siu"]
            rows.append(
                {
                    "setting": label,
                    "overrides": overrides,
                    "wall_s": wall_s,
                    "metrics": {key: m[key] for key in METRICS},
                    "targets": targets(m, vanilla, chance),
                    "siu": report["method_info"]["siu"],
                }
            )
            print(f"{label}: " + ", ".join(f"{x}={m[x]:.3f}" for x in METRICS), flush=True)
    finish("siu_quality", args.quick, args.ranks, chance, vanilla, METRICS, rows)


if __name__ == "__main__":
    main()
