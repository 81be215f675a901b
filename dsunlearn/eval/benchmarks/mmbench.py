"""MMBench's protocol (multiple-choice perception and reasoning; layout in `data/mmbench.py`),
a general-ability check.

Each question is asked with its hint, its options as "A. ..." lines and the instruction
`INSTRUCTION` (LLaVA's MMBench prompt); the greedy answer is read by `parse_option`: an option
letter ("B", "B.", "(B)", "The answer is B"), else the one option whose text it contains; an
answer no rule reads is wrong (there is no GPT matcher offline).

- `mmbench_accuracy`: share of questions answered right with the options in their published
  order;
- `mmbench_circular_accuracy` (`eval.mmbench_circular=true`): MMBench's CircularEval: a
  question with N options is asked N times, its options rotated by 0..N-1 places, and counts
  as right only if every rotation is answered right (a guesser's chance: (1/N)^N);
- `mmbench_unparsed_rate`: share of answers (every rotation) that no rule could read;
- `mmbench_category_<c>_accuracy` / `mmbench_l2_<c>_accuracy`: per `category` and
  `l2-category` (circular when circular evaluation is on).

No forget or retain people, no validation split; `eval.max_items` caps the questions (seeded,
before rotation).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsunlearn.config import EvalConfig
from dsunlearn.data.benchmark import check_split
from dsunlearn.data.examples import GenExample, subsample
from dsunlearn.data.mmbench import LETTERS, MMBench, MMBenchQuestion, load_mmbench
from dsunlearn.engine.dist import DistInfo
from dsunlearn.eval.benchmarks.base import Protocol, Scored, register
from dsunlearn.eval.benchmarks.general import (
    TINY_MODEL_NOTE,
    generate,
    no_validation_split,
    slug,
)

INSTRUCTION = "Answer with the option's letter from the given choices directly."

# A letter written as an option letter: the whole answer ("B", "B.", "(B)"), the start of it
# ("B. a cat", "(B) a cat", "B: a cat"), in parentheses anywhere, or after "answer"/"option"
# ("The answer is B", "Answer: (C)") unless a lowercase word follows (the article "A dog").
_STRONG = (
    re.compile(r"^\(?([A-Z])\)?[.):]?$"),
    re.compile(r"^\(?([A-Z])[.):]"),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?i:answer|option|choice)(?i:\s+is)?\s*[:\-]?\s*\(?([A-Z])\b(?!\s+[a-z])"),
)
_SPLIT = re.compile(r"[\s.()\[\],:;!?*#{}\"]+")
_LOWERCASE_WORD = re.compile(r"[a-z]")
_WORD_LETTERS = ("A", "I")  # also English words: "A dog", "I think"


def parse_option(answer: str, options: Sequence[str]) -> int | None:
    """The position of the option `answer` picks among `options`, or None if no rule reads it
    (or it names several): an option letter in a letter form (`_STRONG`), else a lone option
    letter among the words ("A"/"I" followed by a lowercase word are English, not letters),
    else the one option whose text (whole words, any case) the answer contains; an option
    whose text lies inside another found option's text ("cat" in "black cat") yields to it."""
    text = answer.strip().strip("*`'\" ")
    if not text or len(options) < 1:
        return None
    letters = LETTERS[: len(options)]
    strong = {m for rx in _STRONG for m in rx.findall(text) if m in letters}
    if len(strong) == 1:
        return letters.index(strong.pop())
    if strong:
        return None
    tokens = [t for t in _SPLIT.split(text) if t]
    bare = set()
    for i, t in enumerate(tokens):
        if t not in letters:
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if t in _WORD_LETTERS and _LOWERCASE_WORD.match(nxt):
            continue
        bare.add(t)
    if len(bare) == 1:
        return letters.index(bare.pop())
    if bare:
        return None
    low = text.casefold()
    texts = [o.casefold().strip() for o in options]
    hits = [
        i
        for i, o in enumerate(texts)
        if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", low) is not None
    ]
    if len(hits) > 1:
        hits = [i for i in hits if not any(j != i and texts[i] in texts[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def rotate(options: Sequence[str], answer: int, shift: int) -> tuple[tuple[str, ...], int]:
    """The options moved `shift` places to the left (the option at `shift` comes first) and
    where the right one then is: MMBench's circular passes are shifts 0..N-1."""
    n = len(options)
    shift %= n
    return tuple(options[shift:]) + tuple(options[:shift]), (answer - shift) % n


def mmbench_prompt(question: MMBenchQuestion, options: Sequence[str]) -> str:
    """Hint, question, "A. ..." option lines, then `INSTRUCTION`, one per line."""
    lines = [question.hint] if question.hint else []
    lines.append(question.question)
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def circular_accuracy(hits: Sequence[Sequence[bool]]) -> float:
    """Share of questions whose every pass (one list of hits per question) is right."""
    if not hits or any(not h for h in hits):
        raise ValueError("every question needs at least one pass")
    return sum(all(h) for h in hits) / len(hits)


@dataclass
class MMBenchSets:
    source: str
    questions: list[MMBenchQuestion]
    items: list[GenExample]  # every asked prompt (each rotation of each question)
    question_of: list[int]  # per item: position of its question in `questions`
    options: list[tuple[str, ...]]  # per item: the options in the order asked
    answers: list[int]  # per item: position of the right option as asked
    circular: bool
    copies_skipped: int = 0
    in_file: int = 0  # questions in the file (before the cap)


def mmbench_sets(bench: MMBench, cfg: EvalConfig, seed: int = 0) -> MMBenchSets:
    """The questions (at most `cfg.max_items`, seeded) with their pictures; with
    `cfg.mmbench_circular` every rotation of each question's options, else the published order."""
    chosen = subsample(bench.questions, cfg.max_items, seed)
    sets = MMBenchSets(
        bench.source,
        chosen,
        [],
        [],
        [],
        [],
        cfg.mmbench_circular,
        bench.copies_skipped,
        len(bench.questions),
    )
    for qi, q in enumerate(chosen):
        image = bench.image(q.index)
        for shift in range(len(q.options) if cfg.mmbench_circular else 1):
            options, answer = rotate(q.options, q.answer, shift)
            sets.items.append(GenExample(mmbench_prompt(q, options), LETTERS[answer], image, ""))
            sets.question_of.append(qi)
            sets.options.append(options)
            sets.answers.append(answer)
    return sets


def _by(keys: Sequence[str], right: Sequence[bool], prefix: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, r in zip(keys, right, strict=True):
        if k:
            groups[k].append(r)
    return {f"{prefix}_{slug(k)}_accuracy": sum(v) / len(v) for k, v in sorted(groups.items())}


def mmbench_scores(
    sets: MMBenchSets, answers: Sequence[str], detail: bool = True
) -> dict[str, float]:
    """`mmbench_accuracy` (published order), `mmbench_circular_accuracy` (when circular),
    `mmbench_unparsed_rate`; with `detail`, per category and l2-category."""
    if len(answers) != len(sets.items):
        raise ValueError(f"{len(answers)} answers for {len(sets.items)} MMBench prompts")
    picked = [parse_option(a, o) for a, o in zip(answers, sets.options, strict=True)]
    passes: list[list[bool]] = [[] for _ in sets.questions]
    for p, right, qi in zip(picked, sets.answers, sets.question_of, strict=True):
        passes[qi].append(p == right)
    first = [h[0] for h in passes]
    out = {
        "mmbench_accuracy": sum(first) / len(first),
        "mmbench_unparsed_rate": sum(p is None for p in picked) / len(picked),
    }
    verdict = first
    if sets.circular:
        out["mmbench_circular_accuracy"] = circular_accuracy(passes)
        verdict = [all(h) for h in passes]
    if detail:
        out.update(_by([q.category for q in sets.questions], verdict, "mmbench_category"))
        out.update(_by([q.l2_category for q in sets.questions], verdict, "mmbench_l2"))
    return out


def chance(sets: MMBenchSets) -> float:
    """A uniform guesser's expected accuracy: mean 1/N (circular: (1/N)^N)."""
    n = [len(q.options) for q in sets.questions]
    return sum((1 / k) ** (k if sets.circular else 1) for k in n) / len(n)


@register
class MMBenchProtocol(Protocol):
    name = "mmbench"

    def build(self, split: str) -> MMBenchSets:
        check_split(split)
        if split == "val":
            raise no_validation_split("MMBench")
        return mmbench_sets(load_mmbench(self.path), self.cfg, self.seed)

    def score(
        self,
        model: Any,
        processor: Any,
        sets: MMBenchSets,
        info: DistInfo,
        zero3: bool,
        original: Scored | None = None,
    ) -> Scored:
        answers = generate(model, processor, sets.items, self.cfg, info, zero3)
        return Scored(mmbench_scores(sets, answers))

    def facts(self, sets: MMBenchSets, with_original: bool) -> dict[str, Any]:
        notes = [
            "general ability: no forget or retain people; prompt = hint, question, 'A. ...' "
            f"option lines and {INSTRUCTION!r}; greedy answer of eval.gen_max_new_tokens tokens",
            "answer read as an option letter ('B', 'B.', '(B)', 'The answer is B'), else the one "
            "option whose text it contains; unreadable = wrong (no GPT matcher offline)",
        ]
        if sets.circular:
            notes.append(
                "mmbench_circular_accuracy: each question asked once per rotation of its "
                "options (N options: N passes), right only if every pass is right; "
                "mmbench_accuracy: the first pass (published order); per-category: circular"
            )
        else:
            notes.append("one pass, published option order (eval.mmbench_circular=true: circular)")
        if sets.copies_skipped:
            notes.append(
                f"{sets.copies_skipped} pre-rotated copies in the TSV (index >= 1000000) left out: "
                "circular evaluation rotates the options itself"
            )
        notes.append(TINY_MODEL_NOTE)
        return {
            "questions": len(sets.questions),
            "questions_in_file": sets.in_file,
            "prompts": len(sets.items),
            "circular": sets.circular,
            "chance": round(chance(sets), 4),
            "notes": notes,
        }
