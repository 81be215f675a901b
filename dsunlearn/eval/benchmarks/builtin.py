"""The built-in benchmark's protocol (the demo's metrics, `eval/evaluate.py`) plus min-k%
membership inference.

Test split: multiple choice on the training pictures (`forget_vqa_acc`, `retain_vqa_acc`), on
the held-out Test_Set pictures (`*_heldout_vqa_acc`) and by name without a picture
(`*_text_qa_acc`); ROUGE-L of greedy answers; SIU's eff/gen/div/flu on identity probes; and
`mia_mink20_auc_forget_vs_heldout`: members = the forget people's training VQA pairs on their
training pictures, non-members = the same pairs on their held-out Test_Set pictures (never
trained on), so only whether the picture was seen differs.

Validation split (`Benchmark.split("val")`: the Val_Set pictures, or the seeded item hash of a
benchmark without one): the four multiple-choice metrics only, capped at `eval.val_max_items`,
no generation: it runs every `eval.every` iterations during unlearning and must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsunlearn.config import EvalConfig
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.data.examples import QAExample
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.benchmarks.base import Protocol, Scored, register
from dsunlearn.eval.benchmarks.membership import MiaSets, capped, mia_mink_auc
from dsunlearn.eval.evaluate import EvalSets, build_eval_sets, evaluate_suite
from dsunlearn.eval.verdict import truth_ratios

MIA_KEY = "mia_mink20_auc_forget_vs_heldout"
MIA_NOTE = (
    f"{MIA_KEY}: min-k% (k=20) ROC AUC, members = the forget people's training VQA pairs on "
    "their training images, non-members = the same pairs on their held-out Test_Set images "
    "(never trained on); 0.5 = indistinguishable"
)


@dataclass
class BuiltinSets:
    split: str
    suite: EvalSets
    mia: MiaSets | None


def heldout_mia_sets(bench: Benchmark, cfg: EvalConfig, seed: int = 0) -> MiaSets:
    """Members: each forget person's training VQA pairs on each training image; non-members:
    the same pairs on each of that person's held-out Test_Set images (never trained on)."""
    members, nonmembers = [], []
    heldout = {r.id: r.images for r in bench.test_forget}
    for r in bench.forget:
        for q, a in r.metadata:
            members += [QAExample(q, a, im, r.id) for im in r.images]
            nonmembers += [QAExample(q, a, im, r.id) for im in heldout.get(r.id, [])]
    return capped(members, nonmembers, cfg, seed)


class BenchmarkProtocol(Protocol):
    """A protocol over an MLLMU-Bench-shaped folder (built-in or real), loaded once."""

    def benchmark(self) -> Benchmark:
        """The benchmark the caller loaded (the run's own data), else the one at `path`."""
        if self._bench is None:
            self._bench = load_benchmark(
                self.path,
                forget_pct=self.data.forget_pct,
                val_pct=self.data.val_pct,
                split_seed=self.data.split_seed,
            )
        return self._bench

    def split_rule(self) -> str:
        return self.benchmark().split_rule


@register
class BuiltinProtocol(BenchmarkProtocol):
    name = "builtin"
    forget_key = "forget_vqa_acc"
    retain_key = "retain_vqa_acc"
    truth_key = "forget_vqa_acc"

    def build(self, split: str) -> BuiltinSets:
        view = self.benchmark().split(split)
        if split == "val":
            suite = build_eval_sets(
                view,
                self.cfg,
                self.seed,
                with_probes=False,
                with_generation=False,
                max_items=self.cfg.val_max_items,
            )
            return BuiltinSets(split, suite, None)
        suite = build_eval_sets(view, self.cfg, self.seed, self.siu_image_index)
        return BuiltinSets(split, suite, heldout_mia_sets(view, self.cfg))

    def score(
        self,
        model: Any,
        processor: Any,
        sets: BuiltinSets,
        info: DistInfo,
        zero3: bool,
        original: Scored | None = None,
    ) -> Scored:
        reference = original.outputs.get("probe_answers") if original else None
        suite = evaluate_suite(
            model, processor, sets.suite, self.cfg, info, zero3, original_answers=reference
        )
        metrics = dict(suite.metrics)
        metrics.update(mia_mink_auc(model, processor, sets.mia, self.cfg, info, MIA_KEY))
        ratios = []
        if self.truth_key in suite.option_scores:
            items = sets.suite.mc[self.truth_key]
            ratios = truth_ratios(suite.option_scores[self.truth_key], items)
        return Scored(metrics, ratios, {"probe_answers": suite.probe_answers})

    def facts(self, sets: BuiltinSets, with_original: bool) -> dict[str, Any]:
        facts: dict[str, Any] = {"forget_pct": self.data.forget_pct, "notes": []}
        if sets.mia is not None:
            facts["mia"] = sets.mia.facts(MIA_KEY)
            facts["notes"].append(MIA_NOTE)
        if sets.suite.probes and not with_original:
            facts["notes"].append("flu without the original model: on the model's own answers")
        return facts
