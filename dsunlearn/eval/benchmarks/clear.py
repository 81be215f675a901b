"""CLEAR's protocol (hub `therem/CLEAR`), forget percentage `data.forget_pct` (1, 5 or 10).

- `forget_name_mc_acc` / `retain_name_mc_acc`: the person's name among its `perturbed_names`,
  on `forgetXX_perturbed` / `retain_perturbed` (multiple choice by mean token log-likelihood);
  its items' truth ratios (the true name against the perturbed ones) give forget quality;
- `forget_caption_rouge_l` / `retain_caption_rouge_l`: greedy caption of `forgetXX` /
  `retainXX` pictures vs the caption;
- `forget_text_qa_rouge_l` / `retain_text_qa_rouge_l`: the TOFU text rows of the `+tofu`
  configs;
- `real_faces_acc`, `real_world_acc`: multiple choice;
- `mia_mink20_auc_caption_vs_perturbed`: min-k% (k = 20) ROC AUC telling members (each
  `forgetXX_perturbed` picture with its true caption, which unlearning trains on) from
  non-members (the same picture with each of its `perturbed_captions`: same style, same person,
  never in any training set). CLEAR has no never-seen pictures of the forget people, so the text
  is what differs here; 0.5 = the true caption no longer stands out.

Validation and test: the loader's seeded hash over rows (`clear.load_clear(split=...)`), keyed
by the picture, so one picture is in one split in every config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsunlearn.data import clear as clear_data
from dsunlearn.data.benchmark import check_split
from dsunlearn.data.examples import GenExample, MCExample, QAExample, subsample
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import DataError
from dsunlearn.eval.benchmarks.base import Protocol, Scored, register
from dsunlearn.eval.benchmarks.membership import MiaSets, capped, mia_mink_auc
from dsunlearn.eval.evaluate import EvalSets, evaluate_suite
from dsunlearn.eval.metrics import name_choice_options
from dsunlearn.eval.verdict import truth_ratios

MIA_KEY = "mia_mink20_auc_caption_vs_perturbed"
# CLEAR has captions and names but no question for them: these prompts are ours.
NAME_PROMPT = "The name of the person on the image is"
CAPTION_PROMPT = clear_data.CAPTION_PROMPT  # also the question unlearning trains on


@dataclass
class ClearSets:
    split: str
    suite: EvalSets
    mia: MiaSets | None


@register
class ClearProtocol(Protocol):
    name = "clear"
    forget_key = "forget_name_mc_acc"
    retain_key = "retain_name_mc_acc"
    truth_key = "forget_name_mc_acc"

    def load(self, config: str, split: str) -> clear_data.ClearSplit:
        return clear_data.load_clear(
            self.path, config, split=split, val_pct=self.data.val_pct, seed=self.data.split_seed
        )

    def build(self, split: str) -> ClearSets:
        """CLEAR's evaluation sets of `split`; a config missing from the folder or with the
        wrong columns is a one-line DataError."""
        check_split(split)
        forget = clear_data.forget_config(self.data.forget_pct)
        retain = clear_data.retain_config(self.data.forget_pct)
        cap_n = self.cfg.val_max_items if split == "val" else self.cfg.max_items

        def cap(items: list[Any]) -> list[Any]:
            return subsample(items, cap_n, self.seed)

        def name_mc(config: str) -> list[MCExample]:
            out = []
            for i, row in enumerate(self.load(config, split).captions):
                if not row.name:
                    continue
                options, answer = name_choice_options(row.name, row.perturbed_names, position=i)
                if len(options) > 1:
                    out.append(MCExample(NAME_PROMPT, options, answer, row.image, row.name))
            return out

        def choice_mc(config: str) -> list[MCExample]:
            out = []
            for i, row in enumerate(self.load(config, split).choices):
                options, answer = name_choice_options(row.answer, row.options, position=i)
                question = row.question or NAME_PROMPT
                out.append(MCExample(question, options, answer, row.image, row.answer))
            return out

        def captions(config: str) -> list[GenExample]:
            rows = self.load(config, split).captions
            return [GenExample(CAPTION_PROMPT, r.caption, r.image, r.name or "") for r in rows]

        def text_qa(config: str) -> list[GenExample]:
            rows = self.load(config, split).text_qa
            return [GenExample(r.question, r.answer, None, "") for r in rows]

        mc = {
            "forget_name_mc_acc": cap(name_mc(forget + "_perturbed")),
            "retain_name_mc_acc": cap(name_mc("retain_perturbed")),
            "real_faces_acc": cap(choice_mc("real_faces")),
            "real_world_acc": cap(choice_mc("real_world")),
        }
        gen = {
            "forget_caption_rouge_l": cap(captions(forget)),
            "retain_caption_rouge_l": cap(captions(retain)),
            "forget_text_qa_rouge_l": cap(text_qa(forget + "+tofu")),
            "retain_text_qa_rouge_l": cap(text_qa(retain + "+tofu")),
        }
        if not mc["forget_name_mc_acc"] or not gen["forget_caption_rouge_l"]:
            raise DataError(
                f"{self.path}: CLEAR config '{forget}' has no picture of a named person in the "
                f"{split} split"
            )
        suite = EvalSets(mc={k: v for k, v in mc.items() if v}, gen=gen, probes=[])
        mia = self.mia_sets(forget, split) if split == "test" else None
        return ClearSets(split, suite, mia)

    def mia_sets(self, forget: str, split: str) -> MiaSets:
        """Members: each `forgetXX_perturbed` picture with its true caption (the one unlearning
        trains on); non-members: the same picture with each of its `perturbed_captions` (never
        trained on, same style and person)."""
        members, nonmembers = [], []
        for r in self.load(forget + "_perturbed", split).captions:
            entity = r.name or ""
            members.append(QAExample(CAPTION_PROMPT, r.caption, r.image, entity))
            nonmembers += [
                QAExample(CAPTION_PROMPT, c, r.image, entity) for c in r.perturbed_captions
            ]
        return capped(members, nonmembers, self.cfg, self.seed)

    def score(
        self,
        model: Any,
        processor: Any,
        sets: ClearSets,
        info: DistInfo,
        zero3: bool,
        original: Scored | None = None,
    ) -> Scored:
        suite = evaluate_suite(model, processor, sets.suite, self.cfg, info, zero3)
        metrics = dict(suite.metrics)
        metrics.update(mia_mink_auc(model, processor, sets.mia, self.cfg, info, MIA_KEY))
        items = sets.suite.mc[self.truth_key]
        return Scored(metrics, truth_ratios(suite.option_scores[self.truth_key], items))

    def split_rule(self) -> str:
        return clear_data.split_rule(self.data.val_pct, self.data.split_seed)

    def facts(self, sets: ClearSets, with_original: bool) -> dict[str, Any]:
        pct = self.data.forget_pct
        f, r = clear_data.forget_config(pct), clear_data.retain_config(pct)
        tail = ["retain_perturbed", "real_faces", "real_world"]
        facts: dict[str, Any] = {
            "forget_pct": pct,
            "configs": [f, f + "_perturbed", f + "+tofu", r, r + "+tofu", *tail],
            "notes": [
                "multiple choice by mean token log-likelihood; name options = the true name and "
                "its perturbed_names (real_faces / real_world: answer and options)",
                f"captions: greedy answer to {CAPTION_PROMPT!r}, ROUGE-L F1 against the caption",
                "text QA: the +tofu configs' text rows, ROUGE-L F1",
            ],
        }
        if sets.mia is not None:
            facts["mia"] = sets.mia.facts(MIA_KEY)
            facts["notes"].append(
                f"{MIA_KEY}: min-k% (k=20) ROC AUC, members = each forget picture with its true "
                f"caption (the answer to {CAPTION_PROMPT!r}), non-members = the same picture "
                "with each of its perturbed_captions (never trained on, same style and person: "
                "CLEAR has no never-seen pictures of the forget people); 0.5 = the true caption "
                "no longer stands out"
            )
        return facts
