"""The metric suite of a run: which examples feed which metric, and computing them all.

Metric names (in [0, 1] unless said otherwise):
- forget_vqa_acc / retain_vqa_acc: multiple choice about the training images;
- forget_heldout_vqa_acc / retain_heldout_vqa_acc: the same questions on held-out images;
- forget_text_qa_acc / retain_text_qa_acc: the facts asked by name, no image (must be kept);
- forget_gen_rouge_l / retain_gen_rouge_l: greedy answers to image questions, ROUGE-L F1.

SIU's MMUBench metrics, on identity probes ("who is this?" paraphrases about a picture of each
forget entity; greedy answers):
- eff: share of answers about the one training image SIU sees that do not name the entity;
- gen: the same on the entity's held-out images;
- div: unique words / words per answer, averaged over every probe answer;
- flu: perplexity (>= 1, lower is better, NOT in [0, 1]) of the evaluated model on the original
  model's probe answers, the entity's name tokens left out of the labels. Without the original
  answers, on the model's own answers (so the vanilla row has its own flu).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dsunlearn.config import EvalConfig
from dsunlearn.data.examples import (
    ProbeExample,
    gen_vqa_examples,
    identity_probe_examples,
    mc_text_examples,
    mc_vqa_examples,
    subsample,
)
from dsunlearn.data.siu import name_token_ids
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.metrics import accuracy, mean, perplexity, probe_metrics, rouge_l
from dsunlearn.eval.scoring import (
    answer_nll,
    eval_mode,
    generate_answers,
    option_scores,
    picked_correctly,
)

CHANCE = 0.25  # four options per multiple-choice question
PROBE_MIN_NEW_TOKENS = 16  # EvalConfig has no probe length of its own: see probe_max_new_tokens


@dataclass
class EvalSets:
    mc: dict[str, list[Any]]  # metric name -> multiple-choice examples
    gen: dict[str, list[Any]]  # metric name -> generation examples
    probes: list[ProbeExample] = field(default_factory=list)  # eff / gen / div / flu


def build_eval_sets(
    bench: Any,
    cfg: EvalConfig,
    seed: int = 0,
    siu_image_index: int = 0,
    with_probes: bool = True,
    with_generation: bool = True,
    max_items: int | None = None,
) -> EvalSets:
    """Every evaluation set; `siu_image_index` picks the training image of the eff probes (the
    one SIU fine-tunes on, `siu.choose_image`). Probes are never subsampled: they are few (forget
    entities x 5 x images) and eff/gen compare the train image with the held-out ones.
    `max_items` overrides `cfg.max_items` (the validation split has its own cap). A metric whose
    people have no items (e.g. held-out pictures in the validation view) is left out."""
    forget_ids = {r.id for r in bench.forget}
    test_forget = [r for r in bench.test if r.id in forget_ids]
    test_retain = [r for r in bench.test if r.id not in forget_ids]

    def cap(items: list[Any]) -> list[Any]:
        return subsample(items, cfg.max_items if max_items is None else max_items, seed)

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
    probes = identity_probe_examples(bench, siu_image_index) if with_probes else []
    return EvalSets(
        mc={k: v for k, v in mc.items() if v},
        gen={k: v for k, v in gen.items() if v} if with_generation else {},
        probes=probes,
    )


def per_rank_batch(cfg: EvalConfig, info: DistInfo) -> int:
    """Rows per forward on each rank: the global `cfg.batch_size` split over the ranks."""
    return max(1, cfg.batch_size // info.world_size)


def probe_max_new_tokens(cfg: EvalConfig) -> int:
    # EvalConfig has no probe setting (config.py is not ours to grow): the new-name answers are
    # ~8 words, longer than cfg.gen_max_new_tokens' default 8 tokens, so probes get at least 16.
    return max(cfg.gen_max_new_tokens, PROBE_MIN_NEW_TOKENS)


def generate_probe_answers(
    model: Any, processor: Any, sets: EvalSets, cfg: EvalConfig, info: DistInfo, zero3: bool
) -> list[str]:
    """Greedy answers to `sets.probes`, in order, on every rank; all ranks must call this."""
    if not sets.probes:
        return []
    with eval_mode(model):
        return generate_answers(
            model,
            processor,
            sets.probes,
            per_rank_batch(cfg, info),
            probe_max_new_tokens(cfg),
            info,
            zero3,
        )


def probe_fluency(
    model: Any,
    processor: Any,
    probes: Sequence[ProbeExample],
    answers: Sequence[str],
    per_rank_batch: int,
    info: DistInfo,
) -> float:
    """FLU: perplexity of `model` on `answers` to `probes`, each entity's name tokens
    (`siu.name_token_ids`) left out of the labels; all ranks must call this together."""
    if len(answers) != len(probes):
        raise ValueError(f"{len(answers)} answers for {len(probes)} probes")
    tok = processor.tokenizer
    names: dict[str, list[int]] = {}
    for p in probes:
        if p.name not in names:
            names[p.name] = name_token_ids(tok, p.name)
    skip = [names[p.name] for p in probes]
    nll, tokens = answer_nll(model, processor, probes, answers, per_rank_batch, info, skip)
    return perplexity(nll, tokens)


@dataclass
class SuiteScores:
    """What one model scored on an `EvalSets`: the metrics, each multiple-choice item's option
    scores (mean token log-likelihood, per metric; the truth ratio is made of them) and the
    model's own greedy probe answers (the reference of later models' flu)."""

    metrics: dict[str, float]
    option_scores: dict[str, list[list[float]]] = field(default_factory=dict)
    probe_answers: list[str] = field(default_factory=list)


def evaluate_suite(
    model: Any,
    processor: Any,
    sets: EvalSets,
    cfg: EvalConfig,
    info: DistInfo,
    zero3: bool,
    include_generation: bool = True,
    original_answers: list[str] | None = None,
    probe_answers: list[str] | None = None,
) -> SuiteScores:
    """Compute every metric; all ranks must call this together.

    `original_answers`: the vanilla model's probe answers (`generate_probe_answers`), for flu;
    None scores the model on its own answers. `probe_answers`: this model's own probe answers
    if the caller already generated them (greedy, so identical), to skip generating them again.
    Without `include_generation` no generation runs at all: no rouge, eff, gen, div or flu.
    """
    per_rank = per_rank_batch(cfg, info)
    out = SuiteScores(metrics={})
    with eval_mode(model):
        for name, items in sets.mc.items():
            if items:
                # 4 option rows per question: keep the forward batch near cfg.batch_size rows.
                scores = option_scores(model, processor, items, max(1, per_rank // 4), info)
                out.option_scores[name] = scores
                out.metrics[name] = accuracy(picked_correctly(scores, items))
        if include_generation:
            for name, items in sets.gen.items():
                if items:
                    answers = generate_answers(
                        model, processor, items, per_rank, cfg.gen_max_new_tokens, info, zero3
                    )
                    out.metrics[name] = mean(
                        [rouge_l(a, it.reference) for a, it in zip(answers, items, strict=True)]
                    )
        if include_generation and sets.probes:
            own = probe_answers
            if own is None:
                own = generate_probe_answers(model, processor, sets, cfg, info, zero3)
            elif len(own) != len(sets.probes):
                raise ValueError(f"{len(own)} probe answers for {len(sets.probes)} probes")
            out.probe_answers = list(own)
            out.metrics.update(
                probe_metrics(own, [p.name for p in sets.probes], [p.split for p in sets.probes])
            )
            reference = own if original_answers is None else original_answers
            out.metrics["flu"] = probe_fluency(
                model, processor, sets.probes, reference, per_rank, info
            )
    return out
