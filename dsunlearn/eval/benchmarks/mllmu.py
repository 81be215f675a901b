"""MLLMU-Bench's own protocol, for `dsunlearn eval --benchmark mllmu`.

Every score is generated (greedy) and read the way MLLMU-Bench reads it, on four sets of people
and two kinds of question (papers README, "Benchmarks"):

- sets: ``forget`` (the forget split), ``test`` (the forget people's other pictures and
  paraphrased questions, Test_Set), ``retain`` (the retain split) and ``celebrity``
  (`Retain_Set/`, real people; omitted, with the reason in the report, when the folder has none);
- kinds: ``image`` (Image_Textual: the question is about the picture, which is attached) and
  ``text`` (Pure_Text: the question names the person, no picture).

Metric names are ``{set}_{kind}_{metric}``:

- ``mc_acc`` / ``mc_fewshot_acc``: the options lettered A-D under the question and the
  instruction to answer with the letter (`metrics.few_shot_prompt`); the answer's letter is read
  by `metrics.parse_choice_letter`. Few-shot puts `SHOTS` solved questions of the same kind from
  retain people (never the asked person) before it, as text: the asked question's picture is the
  only picture. `mc_no_letter_rate` is the share of letter answers that name no option at all
  (a model that ignores the format scores 0, not chance).
- ``gen_rouge_l`` / ``gen_bleu``: Generation_Task answers, ROUGE-L F1 and sentence BLEU-4
  (`metrics.sentence_bleu`, nltk's smoothing 1 as MLLMU-Bench uses) against the ground truth.
- ``cloze_acc``: Mask_Task sentences ("__" is the blank) with `CLOZE_INSTRUCTION`; correct when
  the ground truth occurs in the answer (`metrics.cloze_correct`).

Plus min-k% membership inference (as the built-in protocol: the forget people's training VQA
pairs on their training pictures vs on their Test_Set pictures) and, for forget quality, the
truth ratios of the forget people's picture questions scored by option likelihood
(`verdict.py`; the letter answers of a generation have no probability to compare).

Validation and test: `Benchmark.split` (a folder's Val_Set/, else the seeded item hash, which
also splits the celebrities' items).

Every model-touching function must be called by all ranks together (items are sharded over
ranks by `scoring.generate_answers`), so it runs on ZeRO-3 sharded weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dsunlearn.config import EvalConfig
from dsunlearn.data.benchmark import Benchmark, EntityRecord
from dsunlearn.data.examples import (
    GenExample,
    MCExample,
    cloze_examples,
    gen_examples,
    mc_text_examples,
    mc_vqa_examples,
    subsample,
)
from dsunlearn.data.mllmu import (
    CELEBRITY_DIR,
    TEST_DIR,
    TYPE_IMAGE,
    TYPE_TEXT,
    load_celebrities,
    split_records,
)
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.benchmarks.base import Scored, register
from dsunlearn.eval.benchmarks.builtin import MIA_KEY, MIA_NOTE, BenchmarkProtocol, heldout_mia_sets
from dsunlearn.eval.benchmarks.membership import MiaSets, mia_mink_auc
from dsunlearn.eval.evaluate import per_rank_batch
from dsunlearn.eval.metrics import (
    MC_LETTERS,
    cloze_correct,
    few_shot_prompt,
    mean,
    parse_choice_letter,
    rouge_l,
    sentence_bleu,
)
from dsunlearn.eval.scoring import eval_mode, generate_answers, option_scores
from dsunlearn.eval.verdict import truth_ratios

SETS = ("forget", "test", "retain", "celebrity")
KINDS = ("image", "text")
SHOTS = 2
# A letter, maybe "(B)" or "B." and a word more: a few tokens are enough and keep it cheap.
LETTER_MAX_NEW_TOKENS = 4
CLOZE_INSTRUCTION = 'Fill in the blank "__". Answer with the missing words only.'
NO_LETTER_KEY = "mc_no_letter_rate"


@dataclass(frozen=True)
class LetterQuestion:
    """A lettered multiple-choice prompt; `reference` is the correct letter among `letters`."""

    question: str
    reference: str
    letters: str
    image: Image.Image | None
    entity_id: str


@dataclass
class MllmuSets:
    """Metric key -> its items; `gen` keys are prefixes (`..._gen`) scored by ROUGE-L and BLEU.
    `omitted`: metric pattern -> why it is not computed."""

    letter: dict[str, list[LetterQuestion]] = field(default_factory=dict)
    gen: dict[str, list[GenExample]] = field(default_factory=dict)
    cloze: dict[str, list[GenExample]] = field(default_factory=dict)
    omitted: dict[str, str] = field(default_factory=dict)
    # the forget people's picture questions scored by option likelihood: their truth ratios
    truth: list[MCExample] = field(default_factory=list)
    mia: MiaSets | None = None


def letter_prompt(item: MCExample, shots: Sequence[MCExample] = ()) -> LetterQuestion:
    """`item` as a lettered question, with the solved `shots` before it."""
    examples = [(s.question, s.options, MC_LETTERS[s.answer_index]) for s in shots]
    return LetterQuestion(
        few_shot_prompt(item.question, item.options, examples),
        MC_LETTERS[item.answer_index],
        MC_LETTERS[: len(item.options)],
        item.image,
        item.entity_id,
    )


def letter_correct(answer: str, item: LetterQuestion) -> tuple[bool, bool]:
    """(correct, named one of the options' letters at all) for a generated answer."""
    chosen = parse_choice_letter(answer, item.letters)
    return chosen == item.reference, chosen is not None


def pick_shots(
    item: MCExample, pool: Sequence[MCExample], k: int, rng: np.random.Generator
) -> list[MCExample]:
    """`k` solved questions from `pool`, none about the asked person and no question twice."""
    seen: set[str] = set()
    candidates = []
    for p in pool:
        if p.entity_id != item.entity_id and p.question not in seen:
            seen.add(p.question)
            candidates.append(p)
    if len(candidates) <= k:
        return candidates
    return [candidates[int(i)] for i in rng.choice(len(candidates), size=k, replace=False)]


def build_mllmu_sets(
    bench: Benchmark,
    celebrities: Sequence[EntityRecord],
    cfg: EvalConfig,
    seed: int = 0,
    shots: int = SHOTS,
) -> MllmuSets:
    """Every item of the protocol, each list capped at `cfg.max_items` (seeded, order kept)."""
    people: dict[str, list[EntityRecord]] = {
        "forget": bench.forget,
        "test": bench.test_forget,
        "retain": bench.retain,
        "celebrity": list(celebrities),
    }
    pools = {"image": mc_vqa_examples(bench.retain), "text": mc_text_examples(bench.retain)}
    types = {"image": TYPE_IMAGE, "text": TYPE_TEXT}
    sets = MllmuSets()
    if not celebrities:
        sets.omitted["celebrity_*"] = f"no {CELEBRITY_DIR}/ (celebrities) in the data folder"
    if not bench.test_forget:
        sets.omitted["test_*"] = f"no {TEST_DIR} rows of forget people"

    def cap(items: list[Any]) -> list[Any]:
        return subsample(items, cfg.max_items, seed)

    for name, records in people.items():
        mc = {"image": mc_vqa_examples(records), "text": mc_text_examples(records)}
        for kind in KINDS:
            key = f"{name}_{kind}"
            asked = cap(mc[kind])
            rng = np.random.default_rng([seed, SETS.index(name), KINDS.index(kind)])
            sets.letter[f"{key}_mc_acc"] = [letter_prompt(m) for m in asked]
            sets.letter[f"{key}_mc_fewshot_acc"] = [
                letter_prompt(m, pick_shots(m, pools[kind], shots, rng)) for m in asked
            ]
            sets.gen[f"{key}_gen"] = cap(gen_examples(records, types[kind]))
            sets.cloze[f"{key}_cloze_acc"] = [
                GenExample(f"{c.question}\n{CLOZE_INSTRUCTION}", c.reference, c.image, c.entity_id)
                for c in cap(cloze_examples(records, types[kind]))
            ]
    for table in (sets.letter, sets.gen, sets.cloze):
        for key in [k for k, v in table.items() if not v]:
            del table[key]  # no such people, or a benchmark without that kind of item
    return sets


def _generate_all(
    model: Any,
    processor: Any,
    table: dict[str, list[Any]],
    max_new_tokens: int,
    cfg: EvalConfig,
    info: DistInfo,
    zero3: bool,
) -> dict[str, list[str]]:
    """One sharded generation pass over every list of `table` (full batches across metrics)."""
    flat = [(key, it) for key, items in table.items() for it in items]
    if not flat:
        return {}
    answers = generate_answers(
        model,
        processor,
        [it for _, it in flat],
        per_rank_batch(cfg, info),
        max_new_tokens,
        info,
        zero3,
    )
    out: dict[str, list[str]] = {key: [] for key in table}
    for (key, _), a in zip(flat, answers, strict=True):
        out[key].append(a)
    return out


def evaluate_mllmu(
    model: Any, processor: Any, sets: MllmuSets, cfg: EvalConfig, info: DistInfo, zero3: bool
) -> dict[str, float]:
    """Every metric of the protocol; all ranks must call this together."""
    with eval_mode(model):
        letters = _generate_all(
            model, processor, sets.letter, LETTER_MAX_NEW_TOKENS, cfg, info, zero3
        )
        free = _generate_all(
            model,
            processor,
            {**sets.gen, **sets.cloze},
            cfg.gen_max_new_tokens,
            cfg,
            info,
            zero3,
        )
    out: dict[str, float] = {}
    named: list[bool] = []
    for key, items in sets.letter.items():
        verdicts = [letter_correct(a, it) for a, it in zip(letters[key], items, strict=True)]
        out[key] = mean([float(c) for c, _ in verdicts])
        named += [n for _, n in verdicts]
    if named:
        out[NO_LETTER_KEY] = 1.0 - mean([float(n) for n in named])
    for key, items in sets.gen.items():
        pairs = list(zip(free[key], items, strict=True))
        out[f"{key}_rouge_l"] = mean([rouge_l(a, it.reference) for a, it in pairs])
        out[f"{key}_bleu"] = mean([sentence_bleu(a, it.reference) for a, it in pairs])
    for key, items in sets.cloze.items():
        out[key] = mean(
            [float(cloze_correct(a, it.reference)) for a, it in zip(free[key], items, strict=True)]
        )
    return out


@register
class MllmuProtocol(BenchmarkProtocol):
    name = "mllmu"
    forget_key = "forget_image_mc_acc"
    retain_key = "retain_image_mc_acc"
    truth_key = "forget_image_mc_acc"

    def build(self, split: str) -> MllmuSets:
        bench = self.benchmark()
        view = bench.split(split)
        cap = self.cfg.val_max_items if split == "val" else self.cfg.max_items
        cfg = dataclasses.replace(self.cfg, max_items=cap)
        celebrities = split_records(
            load_celebrities(self.path), split, self.data.val_pct, self.data.split_seed
        )
        sets = build_mllmu_sets(view, celebrities, cfg, self.seed)
        sets.truth = subsample(mc_vqa_examples(view.forget), cap, self.seed)
        if split == "test":
            sets.mia = heldout_mia_sets(view, cfg)
        return sets

    def score(
        self,
        model: Any,
        processor: Any,
        sets: MllmuSets,
        info: DistInfo,
        zero3: bool,
        original: Scored | None = None,
    ) -> Scored:
        metrics = evaluate_mllmu(model, processor, sets, self.cfg, info, zero3)
        metrics.update(mia_mink_auc(model, processor, sets.mia, self.cfg, info, MIA_KEY))
        ratios: list[float] = []
        if sets.truth:
            with eval_mode(model):
                per_rank = max(1, per_rank_batch(self.cfg, info) // 4)
                scores = option_scores(model, processor, sets.truth, per_rank, info)
            ratios = truth_ratios(scores, sets.truth)
        return Scored(metrics, ratios)

    def facts(self, sets: MllmuSets, with_original: bool) -> dict[str, Any]:
        counts = {
            key: len(v) for table in (sets.letter, sets.gen, sets.cloze) for key, v in table.items()
        }
        facts: dict[str, Any] = {
            "forget_pct": self.data.forget_pct,
            "items": counts,
            "shots": SHOTS,
            "omitted": dict(sets.omitted),
            "notes": [
                "sets: forget, test (forget people's Test_Set pictures), retain, celebrity "
                "(Retain_Set); kinds: image (picture attached) and text (question names the "
                "person)",
                "mc_acc / mc_fewshot_acc: greedy answer to the lettered options, its letter read "
                f"by metrics.parse_choice_letter; few-shot: {SHOTS} solved questions of retain "
                "people as text before it; mc_no_letter_rate: answers naming no option",
                "gen: ROUGE-L F1 and sentence BLEU-4 (smoothing 1); cloze: ground truth in the "
                "answer",
                "truth ratios (forget quality): the forget people's picture questions, options "
                "scored by mean token log-likelihood",
            ],
        }
        if sets.mia is not None:
            facts["mia"] = sets.mia.facts(MIA_KEY)
            facts["notes"].append(MIA_NOTE)
        return facts
