"""The metric suite of a run: which examples feed which metric, and computing them all.

Metric names (all in [0, 1]):
- forget_vqa_acc / retain_vqa_acc: multiple choice about the training images;
- forget_heldout_vqa_acc / retain_heldout_vqa_acc: the same questions on held-out images;
- forget_text_qa_acc / retain_text_qa_acc: the facts asked by name, no image (must be kept);
- forget_gen_rouge_l / retain_gen_rouge_l: greedy answers to image questions, ROUGE-L F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsunlearn.config import EvalConfig
from dsunlearn.data.examples import (
    gen_vqa_examples,
    mc_text_examples,
    mc_vqa_examples,
    subsample,
)
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.metrics import accuracy, mean, rouge_l
from dsunlearn.eval.scoring import generate_answers, score_multiple_choice

CHANCE = 0.25  # four options per multiple-choice question


@dataclass
class EvalSets:
    mc: dict[str, list[Any]]  # metric name -> multiple-choice examples
    gen: dict[str, list[Any]]  # metric name -> generation examples


def build_eval_sets(bench: Any, cfg: EvalConfig, seed: int = 0) -> EvalSets:
    forget_ids = {r.id for r in bench.forget}
    test_forget = [r for r in bench.test if r.id in forget_ids]
    test_retain = [r for r in bench.test if r.id not in forget_ids]

    def cap(items: list[Any]) -> list[Any]:
        return subsample(items, cfg.max_items, seed)

    mc = {
        "forget_vqa_acc": cap(mc_vqa_examples(bench.forget)),
        "forget_heldout_vqa_acc": cap(mc_vqa_examples(test_forget)),
        "retain_vqa_acc": cap(mc_vqa_examples(bench.retain)),
        "retain_heldout_vqa_acc": cap(mc_vqa_examples(test_retain)),
        "forget_text_qa_acc": cap(mc_text_examples(bench.forget)),
        "retain_text_qa_acc": cap(mc_text_examples(bench.retain)),
    }
    gen = {
        "forget_gen_rouge_l": cap(gen_vqa_examples(bench.forget)),
        "retain_gen_rouge_l": cap(gen_vqa_examples(bench.retain)),
    }
    return EvalSets(mc=mc, gen=gen)


def evaluate(
    model: Any,
    processor: Any,
    sets: EvalSets,
    cfg: EvalConfig,
    info: DistInfo,
    zero3: bool,
    include_generation: bool = True,
) -> dict[str, float]:
    """Compute every metric; all ranks must call this together."""
    per_rank = max(1, cfg.batch_size // info.world_size)
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, items in sets.mc.items():
        if items:
            # 4 option rows per question: keep the forward batch near cfg.batch_size rows.
            out[name] = accuracy(
                score_multiple_choice(model, processor, items, max(1, per_rank // 4), info)
            )
    if include_generation:
        for name, items in sets.gen.items():
            if items:
                answers = generate_answers(
                    model, processor, items, per_rank, cfg.gen_max_new_tokens, info, zero3
                )
                out[name] = mean(
                    [rouge_l(a, it.reference) for a, it in zip(answers, items, strict=True)]
                )
    model.train(was_training)
    return out
