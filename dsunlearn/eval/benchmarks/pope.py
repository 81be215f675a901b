"""POPE's protocol (object hallucination; layout in `data/pope.py`), a general-ability check.

Each question ("Is there a <object> in the image?") is asked as it is, about its picture; the
greedy answer is read as POPE's own evaluation script reads it (`pope_yes_no`), and with "yes"
as the positive class:

- `pope_accuracy`, `pope_precision` = TP / (TP + FP), `pope_recall` = TP / (TP + FN),
  `pope_f1`, `pope_yes_ratio` = share of answers read as "yes" (the sets are half "yes", so a
  model that always says yes has yes_ratio 1, recall 1, precision 0.5);
  over every question of every file;
- `pope_<set>_<metric>`: the same per question file (`random`, `popular`, `adversarial`).

There are no forget or retain people and no validation split: POPE is reported, never used to
choose a checkpoint. `eval.max_items` caps the questions per file (seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from dsunlearn.config import EvalConfig
from dsunlearn.data.benchmark import check_split
from dsunlearn.data.examples import GenExample, subsample
from dsunlearn.data.pope import LABELS, Pope, load_pope
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.benchmarks.base import Protocol, Scored, register
from dsunlearn.eval.benchmarks.general import TINY_MODEL_NOTE, generate, no_validation_split

NO_WORDS = frozenset({"No", "no", "not"})
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
PARSE_RULE = (
    "answers read as POPE's evaluation script reads them: the text up to the first '.', "
    "commas removed, split on spaces; 'no' if a word is exactly 'No', 'no' or 'not', else "
    "'yes' (so an empty or off-topic answer counts as yes)"
)


def pope_yes_no(answer: str) -> str:
    """ "yes" or "no", by POPE's rule (`PARSE_RULE`), quirks kept so that numbers compare with
    published ones: "No." and "There is not." are no; "Nope", "NO" and "" are yes."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if NO_WORDS.intersection(words) else "yes"


@dataclass(frozen=True)
class Confusion:
    """Counts of a yes/no classification, "yes" the positive class."""

    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def of(cls, predicted: Sequence[str], labels: Sequence[str]) -> Confusion:
        if len(predicted) != len(labels):
            raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
        pairs = list(zip(predicted, labels, strict=True))
        for p, y in pairs:
            if p not in LABELS or y not in LABELS:
                raise ValueError(f"predictions and labels are 'yes' or 'no', got {p!r}, {y!r}")
        return cls(
            tp=sum(p == "yes" and y == "yes" for p, y in pairs),
            fp=sum(p == "yes" and y == "no" for p, y in pairs),
            tn=sum(p == "no" and y == "no" for p, y in pairs),
            fn=sum(p == "no" and y == "yes" for p, y in pairs),
        )

    def metrics(self) -> dict[str, float]:
        """accuracy, precision, recall, f1, yes_ratio. Undefined ratios (no "yes" answer: no
        precision; no "yes" label: no recall) are 0, as is F1 when both are 0."""
        n = self.tp + self.fp + self.tn + self.fn
        if n == 0:
            raise ValueError("no question to score")
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": (self.tp + self.tn) / n,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": (self.tp + self.fp) / n,
        }


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """The five POPE metrics of raw generated `answers` against "yes"/"no" `labels`."""
    return Confusion.of([pope_yes_no(a) for a in answers], labels).metrics()


@dataclass
class PopeSets:
    source: str
    items: list[GenExample]  # every asked question, file by file; reference = its label
    set_of: list[str]  # per item: its question file's set name
    questions: dict[str, int] = field(default_factory=dict)  # set -> questions asked
    in_files: dict[str, int] = field(default_factory=dict)  # set -> questions in the file


def pope_sets(pope: Pope, cfg: EvalConfig, seed: int = 0) -> PopeSets:
    """Every set's questions (at most `cfg.max_items` per file, seeded) with their pictures;
    each picture is decoded once however many questions ask about it."""
    images: dict[str, Image.Image] = {}
    items: list[GenExample] = []
    set_of: list[str] = []
    asked: dict[str, int] = {}
    for name, questions in pope.sets.items():
        chosen = subsample(questions, cfg.max_items, seed)
        for q in chosen:
            if q.image not in images:
                images[q.image] = pope.image(q.image)
            items.append(GenExample(q.text, q.label, images[q.image], q.question_id))
            set_of.append(name)
        asked[name] = len(chosen)
    in_files = {name: len(qs) for name, qs in pope.sets.items()}
    return PopeSets(pope.source, items, set_of, asked, in_files)


def pope_scores(sets: PopeSets, answers: Sequence[str], detail: bool = True) -> dict[str, float]:
    """`pope_<metric>` over every question; with `detail`, `pope_<set>_<metric>` per file."""
    if len(answers) != len(sets.items):
        raise ValueError(f"{len(answers)} answers for {len(sets.items)} POPE questions")
    labels = [it.reference for it in sets.items]
    out = {f"pope_{k}": v for k, v in pope_metrics(answers, labels).items()}
    if detail:
        for name in sets.questions:
            rows = [i for i, s in enumerate(sets.set_of) if s == name]
            metrics = pope_metrics([answers[i] for i in rows], [labels[i] for i in rows])
            out.update({f"pope_{name}_{k}": v for k, v in metrics.items()})
    return out


@register
class PopeProtocol(Protocol):
    name = "pope"

    def build(self, split: str) -> PopeSets:
        check_split(split)
        if split == "val":
            raise no_validation_split("POPE")
        return pope_sets(load_pope(self.path), self.cfg, self.seed)

    def score(
        self,
        model: Any,
        processor: Any,
        sets: PopeSets,
        info: DistInfo,
        zero3: bool,
        original: Scored | None = None,
    ) -> Scored:
        answers = generate(model, processor, sets.items, self.cfg, info, zero3)
        return Scored(pope_scores(sets, answers))

    def facts(self, sets: PopeSets, with_original: bool) -> dict[str, Any]:
        return {
            "questions": dict(sets.questions),
            "questions_in_files": dict(sets.in_files),
            "chance": 0.5,
            "notes": [
                "general ability (object hallucination): no forget or retain people; the "
                "question text is the prompt, greedy answer of eval.gen_max_new_tokens tokens",
                PARSE_RULE,
                "positive = yes (the object is in the picture): precision = TP/(TP+FP) (0 when "
                "nothing is read as yes), recall = TP/(TP+FN), F1, accuracy; yes_ratio = share "
                "read as yes (the files are half yes: far from 0.5 = a biased model)",
                "pope_<metric>: every question of every file; pope_<set>_<metric>: per file",
                TINY_MODEL_NOTE,
            ],
        }
