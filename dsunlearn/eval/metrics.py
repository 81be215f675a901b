"""Plain metric functions with no model in them, so they can be tested on known answers."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

_TOKEN_RE = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation is ignored for text-overlap metrics."""
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)*len(b)) dynamic programme)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two strings on lower-cased word tokens (0 when either is empty)."""
    p, r = words(prediction), words(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Share of the reference's words recovered in order (MMUBench's MIA metric)."""
    r = words(reference)
    return lcs_length(words(prediction), r) / len(r) if r else 0.0


def accuracy(correct: Sequence[bool]) -> float:
    return sum(map(bool, correct)) / len(correct) if correct else float("nan")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# SIU / MMUBench metrics on the identity probes ("who is this?" about a forget entity's picture)
# ---------------------------------------------------------------------------------------------


def names_entity(answer: str, name: str) -> bool:
    """True when any word of `name` occurs in `answer` as a whole word, case-insensitively.

    Words are `words()` tokens, so "Jorna," names Jorna but "Jornas" does not.
    """
    return not set(words(name)).isdisjoint(words(answer))


def distinct_ratio(answer: str) -> float:
    """Unique words / words of one answer (MMUBench's DIV per answer); 0 for an empty answer."""
    w = words(answer)
    return len(set(w)) / len(w) if w else 0.0


def probe_metrics(
    answers: Sequence[str], names: Sequence[str], splits: Sequence[str]
) -> dict[str, float]:
    """EFF, GEN and DIV of the identity-probe answers (one name and split per answer).

    eff: share of "train"-image answers that do not name the entity; gen: the same on "heldout"
    images; div: mean distinct-word ratio over every answer. A metric without answers is left out.
    """
    if not len(answers) == len(names) == len(splits):
        raise ValueError(
            f"probe columns differ in length: {len(answers)} answers, {len(names)} names, "
            f"{len(splits)} splits"
        )
    out: dict[str, float] = {}
    for metric, split in (("eff", "train"), ("gen", "heldout")):
        kept = [
            not names_entity(a, n)
            for a, n, s in zip(answers, names, splits, strict=True)
            if s == split
        ]
        if kept:
            out[metric] = accuracy(kept)
    if answers:
        out["div"] = mean([distinct_ratio(a) for a in answers])
    return out


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp(total NLL / scored tokens); nan when no token was scored."""
    if tokens <= 0:
        return float("nan")
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


def mia_rouge_recall(answers: Sequence[str], original_answers: Sequence[str]) -> float:
    """MMUBench's MIA: mean ROUGE-L recall of each answer against the original model's answer
    to the same probing prompt (papers README, "MMUBench metrics"). Lower is better: the
    unlearned model no longer reproduces what the original said. nan without answers."""
    if len(answers) != len(original_answers):
        raise ValueError(f"{len(answers)} answers for {len(original_answers)} original answers")
    return mean([rouge_l_recall(a, o) for a, o in zip(answers, original_answers, strict=True)])


# ---------------------------------------------------------------------------------------------
# MLLMU-Bench protocol: letter multiple choice, few-shot prompts, BLEU, cloze
# ---------------------------------------------------------------------------------------------

MC_LETTERS = "ABCD"
# The instruction MLLMU-Bench's evaluation gives LLaVA after the options.
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# "answer", "option" or "choice" (any case), optionally "is" and ":" / "=", then the letter.
_CUE_RE = re.compile(r"(?i:\b(?:answer|option|choice))(?:\s+(?i:is))?\s*[:=]?\s*")
_LETTER_AT_RE = re.compile(r"([(\[])?([A-Za-z])([)\]])?")
_WRAPPED_RE = re.compile(r"[(\[]([A-Za-z])[)\]]")


def _letter_at(text: str, pos: int, letters: str, leading: bool = False) -> str | None:
    """The choice letter starting at `pos`, if what stands there reads as one.

    A letter counts when it is bracketed ("(b)", "[B]"), or followed by ")" "." ":" ","
    or the end of the text, or (upper case only) by white space. A lower-case letter before a
    space is a word ("a dog"), and so is a leading "A" before a lower-case word ("A woman").
    """
    m = _LETTER_AT_RE.match(text, pos)
    if m is None:
        return None
    opened, letter, closed = m.groups()
    if letter.upper() not in letters:
        return None
    rest = text[m.end() :]
    if rest[:1].isalnum() or rest[:1] in ("'", "-"):
        return None  # part of a longer word: "Answer", "B12", "a's"
    if opened or closed:
        return letter.upper() if (opened is None) or (closed is not None) else None
    if rest == "" or rest[0] in ").:,;!?":
        return letter.upper()
    if letter.isupper() and rest[0].isspace():
        nxt = rest.lstrip()[:1]
        if leading and letter == "A" and nxt.islower():
            return None  # the article: "A woman in a red coat"
        return letter
    return None


def parse_choice_letter(text: str, letters: str = MC_LETTERS) -> str | None:
    """The option letter a generated answer chooses, upper case, or None when it names none.

    Looked for in order: after a cue ("Answer: B", "Correct Answer: b)", "the answer is (C)",
    "option D"); at the start ("B", "B.", "(B)", "b) Paris", "C: Paris"); anywhere in
    brackets ("I pick (B)"). MLLMU-Bench's own parser took the first character after
    "Answer:" (eval.py); this one also reads the common forms a chat model writes, and refuses
    words that merely begin with a letter ("A woman ...", "Dunno").
    """
    for m in _CUE_RE.finditer(text):
        found = _letter_at(text, m.end(), letters)
        if found:
            return found
    stripped = text.lstrip(" \t\r\n*\"'`>")
    found = _letter_at(stripped, 0, letters, leading=True)
    if found:
        return found
    for m in _WRAPPED_RE.finditer(text):
        if m.group(1).upper() in letters:
            return m.group(1).upper()
    return None


def format_mc_question(
    question: str, options: Mapping[str, str] | Sequence[str], answer: str | None = None
) -> str:
    """A question with lettered options in MLLMU-Bench's layout ("Question: ...", "A: ...");
    with `answer` (a solved few-shot example) a last line "Correct Answer: <letter>".

    A sequence of options is lettered A, B, C, ... in order; a mapping keeps its own keys.
    """
    if isinstance(options, Mapping):
        pairs = [(str(k), str(v)) for k, v in options.items()]
    else:
        if len(options) > 26:
            raise ValueError(f"{len(options)} options: at most 26 can be lettered")
        pairs = [(chr(ord("A") + i), str(v)) for i, v in enumerate(options)]
    lines = [f"Question: {question}", *(f"{k}: {v}" for k, v in pairs)]
    if answer is not None:
        lines.append(f"Correct Answer: {answer}")
    return "\n".join(lines)


def few_shot_prompt(
    question: str,
    options: Mapping[str, str] | Sequence[str],
    examples: Sequence[tuple[str, Mapping[str, str] | Sequence[str], str]] = (),
    instruction: str = MC_INSTRUCTION,
) -> str:
    """k solved examples (question, options, correct letter), then the question to answer and
    the instruction, separated by blank lines (MLLMU-Bench prepends solved examples from
    people outside the evaluated set). Text only: image placeholders are the caller's."""
    blocks = [format_mc_question(q, o, a) for q, o, a in examples]
    last = format_mc_question(question, options)
    blocks.append(f"{last}\n{instruction}" if instruction else last)
    return "\n\n".join(blocks)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(prediction: str, reference: str, max_n: int = 4, epsilon: float = 0.1) -> float:
    """Sentence BLEU-`max_n` with uniform weights, as MLLMU-Bench computes it (eval.py:
    nltk `sentence_bleu([ref.split()], pred.split(), smoothing_function=method1)`).

    Tokens: white-space split, case kept. p_n = clipped n-gram matches / max(1, prediction
    n-grams); a p_n of 0 becomes epsilon / max(1, prediction n-grams) (Chen & Cherry 2014
    smoothing 1, nltk's method1). BLEU = BP * exp(mean log p_n), BP = 1 if c > r else
    exp(1 - r / c). 0 when no unigram matches (nltk's rule, smoothing or not) or c = 0.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    hyp, ref = prediction.split(), reference.split()
    c, r = len(hyp), len(ref)
    log_sum = 0.0
    for n in range(1, max_n + 1):
        h, rc = _ngrams(hyp, n), _ngrams(ref, n)
        matches = sum(min(cnt, rc[g]) for g, cnt in h.items())
        total = max(1, sum(h.values()))
        if matches == 0:
            if n == 1:
                return 0.0
            log_sum += math.log(epsilon / total)
        else:
            log_sum += math.log(matches / total)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_sum / max_n)


def normalize_answer(text: str) -> str:
    """Lower-cased `words()` joined by single spaces: punctuation, case and spacing ignored."""
    return " ".join(words(text))


def cloze_correct(answer: str, ground_truth: str) -> bool:
    """MLLMU-Bench cloze (Mask_Task): correct when the ground truth occurs in the answer
    (papers README, "Benchmarks"), here after `normalize_answer` on both and on whole words,
    so "Port Velin." matches "born in port velin" but "1984" does not match "19845".
    An empty ground truth is never matched."""
    gt = normalize_answer(ground_truth)
    return bool(gt) and f" {gt} " in f" {normalize_answer(answer)} "


def exact_match(answer: str, ground_truth: str) -> bool:
    """Strict cloze variant: the normalised answer is the normalised ground truth."""
    gt = normalize_answer(ground_truth)
    return bool(gt) and normalize_answer(answer) == gt


# ---------------------------------------------------------------------------------------------
# CLEAR: name multiple choice over the true name and its perturbed names
# ---------------------------------------------------------------------------------------------


def name_choice_options(
    true_name: str, perturbed_names: Sequence[str], position: int = 0
) -> tuple[list[str], int]:
    """(options, answer_index) for CLEAR's `_perturbed` name recognition: the true name among
    its perturbed names, ready for `scoring.score_multiple_choice` (highest mean token
    log-likelihood wins).

    Perturbed names equal to the true name (after `normalize_answer`) or to an earlier one are
    dropped; the true name goes to index `position % len(options)`, so that a caller varying
    `position` per item (e.g. the item index) does not always put it first: argmax keeps the
    first of tied scores, which would favour a fixed index.
    """
    seen = {normalize_answer(true_name)}
    others: list[str] = []
    for p in perturbed_names:
        key = normalize_answer(p)
        if key and key not in seen:
            seen.add(key)
            others.append(p)
    at = position % (len(others) + 1)
    return [*others[:at], true_name, *others[at:]], at
