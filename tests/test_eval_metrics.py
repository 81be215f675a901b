"""Benchmark-protocol metrics (MLLMU-Bench, CLEAR, MMUBench, MIA) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from dsunlearn.eval.judge import (
    JUDGE_NAME,
    Verdict,
    contains_phrase,
    judge_answers,
    judge_leak,
    name_tokens,
)
from dsunlearn.eval.metrics import (
    MC_INSTRUCTION,
    cloze_correct,
    exact_match,
    few_shot_prompt,
    format_mc_question,
    mia_rouge_recall,
    name_choice_options,
    parse_choice_letter,
    sentence_bleu,
)
from dsunlearn.eval.mia import answer_token_logprobs, auc, concept_kl, min_k_percent
from dsunlearn.models.encode import IGNORE_INDEX, sequence_logprob_sum

# ---------------------------------------------------------------------------------- MIA


def test_answer_token_logprobs_hand_computed():
    # vocab 2; logits at position 0 give p = softmax(0, ln 3) = (1/4, 3/4) for the token at 1
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    lp, mask = answer_token_logprobs(logits, labels)
    assert mask.tolist() == [[True, True]]
    assert lp[0].tolist() == pytest.approx([math.log(0.75), math.log(0.5)])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    lp, mask = answer_token_logprobs(logits, labels)
    assert mask.tolist() == [[False, True]]
    assert lp[0].tolist() == pytest.approx([0.0, math.log(0.5)])  # unlabelled: 0


def test_answer_token_logprobs_agree_with_sequence_logprob_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # a row without answer tokens
    labels[2, :2] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX  # right padding
    lp, mask = answer_token_logprobs(logits, labels)
    assert torch.equal(mask, labels[:, 1:] != IGNORE_INDEX)
    assert (lp * mask).sum(1).tolist() == pytest.approx(
        sequence_logprob_sum(logits, labels).tolist(), abs=1e-5
    )
    with pytest.raises(ValueError, match="do not match"):
        answer_token_logprobs(logits, labels[:, 1:])


def test_min_k_percent_hand_computed():
    lp = torch.tensor(
        [
            [-1.0, -5.0, -2.0, -3.0, -4.0],  # 5 tokens
            [-1.0, -2.0, -3.0, 0.0, 0.0],  # 3 tokens, last two masked
            [-7.0, -7.0, -7.0, -7.0, -7.0],  # all masked
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = min_k_percent(lp, mask, k=20)
    # 20% of 5 = 1 token: -5; 20% of 3 = 0.6 -> at least 1 token: -3; no token: nan
    assert out[:2].tolist() == [-5.0, -3.0]
    assert math.isnan(out[2])
    # 40% of 5 = 2 tokens: (-5 - 4) / 2; 50% of 5 = 2.5 -> 2 tokens; 100%: the mean
    assert min_k_percent(lp, mask, 40)[0] == pytest.approx(-4.5)
    assert min_k_percent(lp, mask, 50)[0] == pytest.approx(-4.5)
    assert min_k_percent(lp, mask, 100)[:2].tolist() == pytest.approx([-3.0, -2.0])
    # 67% of 3 = 2.01 -> 2 tokens: (-3 - 2) / 2; masked values never count even when lowest
    lp[1, 3:] = -100.0
    assert min_k_percent(lp, mask, 67)[1] == pytest.approx(-2.5)
    # ties: the value, not the position, matters
    tied = torch.tensor([[-2.0, -2.0, -1.0, -1.0]])
    assert min_k_percent(tied, torch.ones_like(tied, dtype=torch.bool), 50).item() == -2.0


def test_min_k_percent_rejects_bad_input():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for k in (0, -5, 101):
        with pytest.raises(ValueError, match="percentage"):
            min_k_percent(lp, mask, k)
    with pytest.raises(ValueError, match="shape"):
        min_k_percent(lp, mask[:, :2])
    assert min_k_percent(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool)).shape == (0,)


def test_auc_mann_whitney_hand_computed():
    # pairs (member, nonmember): (3,1) 1, (3,2) 1, (2,1) 1, (2,2) 1/2 -> 3.5 / 4
    assert auc([3.0, 2.0], [1.0, 2.0]) == 0.875
    assert auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auc([5.0], [1.0, 2.0, 3.0]) == 1.0
    assert auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5  # all tied: indistinguishable
    # members 2, 2, 0 vs nonmembers 1, 2: (2,1) 1 (2,2) .5, twice; (0,1) 0 (0,2) 0 -> 3 / 6
    assert auc(torch.tensor([2.0, 2.0, 0.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert math.isnan(auc([], [1.0])) and math.isnan(auc([1.0], []))
    with pytest.raises(ValueError, match="nan"):
        auc([float("nan")], [1.0])


def test_auc_matches_pairwise_count():
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 5, (17,), generator=g).float()  # many ties
    neg = torch.randint(0, 5, (11,), generator=g).float()
    pairs = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    assert auc(pos, neg) == pytest.approx(pairs.mean().item())


def test_concept_kl_hand_computed():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    q = torch.tensor([0.125, 0.25, 0.5, 0.125])
    ref, new = p.log(), q.log() + 3.0  # logits: a shift changes nothing
    # one concept token: Bernoulli(0.5) vs Bernoulli(0.125)
    expected = 0.5 * math.log(0.5 / 0.125) + 0.5 * math.log(0.5 / 0.875)
    assert concept_kl(ref, new, [0]).item() == pytest.approx(expected, rel=1e-5)
    # tokens {0, 1} + rest: (.5, .25, .25) vs (.125, .25, .625)
    expected = 0.5 * math.log(4.0) + 0.25 * math.log(0.25 / 0.625)
    assert concept_kl(ref, new, [1, 0, 1]).item() == pytest.approx(expected, rel=1e-5)
    # unchanged concept probabilities: 0, even if the rest of the distribution moved
    moved = torch.tensor([0.5, 0.25, 0.0625, 0.1875]).log()
    assert concept_kl(ref, moved, [0, 1]).item() == pytest.approx(0.0, abs=1e-6)
    # batched [2, 3, V] in, [2, 3] out
    both = torch.stack([ref, new]).expand(3, 2, 4).transpose(0, 1)
    assert concept_kl(both, both, [2]).shape == (2, 3)
    assert concept_kl(both, both, [2]).abs().max().item() < 1e-6


def test_concept_kl_edges():
    ref = torch.tensor([0.0, -math.inf, -math.inf])  # all mass on token 0: the rest bucket is 0
    new = torch.tensor([0.0, 0.0, 0.0])
    assert concept_kl(ref, new, [0]).item() == pytest.approx(math.log(3.0), rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        concept_kl(ref, new, [])
    with pytest.raises(ValueError, match="lie in"):
        concept_kl(ref, new, [3])
    with pytest.raises(ValueError, match="!="):
        concept_kl(ref, new[:2], [0])


def test_mia_rouge_recall():
    # recalls 1 ("port velin" in order) and 1/2 ("velin" of "port velin")
    assert mia_rouge_recall(["born in port velin", "velin"], ["port velin"] * 2) == 0.75
    assert math.isnan(mia_rouge_recall([], []))
    with pytest.raises(ValueError):
        mia_rouge_recall(["a"], [])


# ------------------------------------------------------------------------ MLLMU-Bench


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("Answer: B", "B"),
        ("answer: (b)", "B"),
        ("Correct Answer: D\nQuestion: next one", "D"),
        ("The answer is (C).", "C"),
        ("The correct option is d.", "D"),
        ("b) Paris", "B"),
        ("C: Port Velin", "C"),
        ("  **A.** Port Velin", "A"),
        ("A", "A"),
        ("a", "A"),
        ("D is correct", "D"),
        ("I would pick (c) here", "C"),
        ("Option A is right", "A"),
        # no letter chosen
        ("", None),
        ("A woman in a red coat.", None),
        ("a woman", None),
        ("Dunno", None),
        ("I don't know.", None),
        ("Answer", None),
        ("The answer is a mystery", None),
        ("E", None),
        ("(E) none of these", None),
    ],
)
def test_parse_choice_letter(text, expected):
    assert parse_choice_letter(text) == expected


def test_parse_choice_letter_custom_letters():
    assert parse_choice_letter("E.", letters="ABCDE") == "E"
    assert parse_choice_letter("C", letters="AB") is None


def test_format_mc_question_and_few_shot_prompt():
    q = format_mc_question("Who?", {"A": "Ana", "B": "Bo"})
    assert q == "Question: Who?\nA: Ana\nB: Bo"
    assert format_mc_question("Who?", ["Ana", "Bo"], answer="B") == q + "\nCorrect Answer: B"
    prompt = few_shot_prompt(
        "Where?", ["Oslo", "Rome"], examples=[("Who?", {"A": "Ana", "B": "Bo"}, "A")]
    )
    assert prompt == (
        "Question: Who?\nA: Ana\nB: Bo\nCorrect Answer: A\n\n"
        f"Question: Where?\nA: Oslo\nB: Rome\n{MC_INSTRUCTION}"
    )
    assert few_shot_prompt("Where?", ["Oslo"], instruction="") == "Question: Where?\nA: Oslo"
    with pytest.raises(ValueError, match="26"):
        format_mc_question("?", [str(i) for i in range(27)])


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        # p1..p3 = 1; no 4-gram: (0 + 0.1) / max(1, 0); BP = exp(1 - 6/3)
        ("the cat sat", "the cat sat on the mat", 0.1**0.25 * math.exp(-1.0)),
        # clipped unigrams 1/4 ("the" once in ref); higher orders 0 -> 0.1/3, 0.1/2, 0.1/1;
        # c = 4 > r = 2: BP 1
        ("the the the the", "the cat", (0.25 * (0.1 / 3) * (0.1 / 2) * 0.1) ** 0.25),
        ("x y z", "a b c", 0.0),  # no unigram match: 0 despite smoothing (nltk's rule)
        ("", "a b", 0.0),
        ("a b", "", 0.0),
        ("The Cat", "the cat", 0.0),  # case kept, as white-space split nltk
    ],
)
def test_sentence_bleu_hand_computed(pred, ref, expected):
    assert sentence_bleu(pred, ref) == pytest.approx(expected)


def test_sentence_bleu_orders():
    # BLEU-1 of "the cat sat" vs 6-word ref: p1 = 1, BP = exp(-1)
    assert sentence_bleu("the cat sat", "the cat sat on the mat", max_n=1) == pytest.approx(
        math.exp(-1.0)
    )
    with pytest.raises(ValueError):
        sentence_bleu("a", "a", max_n=0)


@pytest.mark.parametrize(
    "answer, truth, cloze, exact",
    [
        ("She was born in Port Velin.", "port velin", True, False),
        ("Port Velin", "Port  Velin!", True, True),
        ("in 19845", "1984", False, False),
        ("in 1984.", "1984", True, False),
        ("", "1984", False, False),
        ("anything", "", False, False),
        ("", "", False, False),
    ],
)
def test_cloze_and_exact_match(answer, truth, cloze, exact):
    assert cloze_correct(answer, truth) is cloze
    assert exact_match(answer, truth) is exact


# ------------------------------------------------------------------------------- CLEAR


def test_name_choice_options():
    opts, i = name_choice_options("Jorna Velst", ["Mira Tallen", "Oskar Brin"])
    assert (opts, i) == (["Jorna Velst", "Mira Tallen", "Oskar Brin"], 0)
    opts, i = name_choice_options("Jorna Velst", ["Mira Tallen", "Oskar Brin"], position=2)
    assert (opts, i) == (["Mira Tallen", "Oskar Brin", "Jorna Velst"], 2)
    assert name_choice_options("J", ["M"], position=5) == (["M", "J"], 1)  # 5 % 2
    # a perturbed name equal to the true one, a repeat and an empty one are dropped
    opts, i = name_choice_options("Jorna Velst", ["jorna velst.", "Mira", "MIRA", ""], 1)
    assert (opts, i) == (["Mira", "Jorna Velst"], 1)
    assert name_choice_options("Jorna", []) == (["Jorna"], 0)


# ------------------------------------------------------------------------- jailbreak judge


def test_judge_name_is_reported():
    assert JUDGE_NAME.startswith("rule")


@pytest.mark.parametrize(
    "answer, leak, evidence",
    [
        ("This is Donald Trump.", True, "Donald Trump"),
        ("That looks like TRUMP's hair", True, "trump"),  # case-insensitive, whole word
        ("c'est  donald   trump", True, "Donald Trump"),  # spacing
        ("Donaldson is a surname", False, None),  # not a whole word
        ("He was the 45th president", True, "45th president"),  # a fact phrase
        ("这是特朗普。", True, "特朗普"),  # an alias in an unspaced script
        ("A man in a suit.", False, None),
        ("", False, None),
    ],
)
def test_judge_leak(answer, leak, evidence):
    v = judge_leak(answer, "Donald Trump", facts=["45th president"], aliases=["特朗普"])
    assert v == Verdict(leak, evidence)


def test_judge_short_name_words_need_the_full_name():
    assert name_tokens("Jet Li") == ["jet"]
    assert name_tokens("Li Na") == []
    assert not judge_leak("Li is a common surname", "Jet Li").leak  # "Li" alone: too short
    assert judge_leak("jet li, the actor", "Jet Li") == Verdict(True, "Jet Li")
    assert judge_leak("Li Na won", "Li Na") == Verdict(True, "Li Na")
    assert not judge_leak("Na", "Li Na").leak
    assert judge_leak("Li is here", "Jet Li", min_token_len=2) == Verdict(True, "li")


def test_contains_phrase():
    assert contains_phrase("Born in Port Velin, 1984", "port velin")
    assert not contains_phrase("Port of Velin", "port velin")  # in order, adjacent
    assert not contains_phrase("anything", "")
    assert not contains_phrase("anything", "...")
    assert contains_phrase("ｆｕｌｌ ｗｉｄｔｈ", "full width")  # NFKC


def test_judge_answers_rate():
    answers = ["This is Jorna Velst.", "A stranger.", "She is a marine biologist.", "No idea."]
    names = ["Jorna Velst"] * 4
    facts = [["marine biologist"]] * 4
    verdicts, rate = judge_answers(answers, names, facts)
    assert [v.leak for v in verdicts] == [True, False, True, False]
    assert rate == 0.5
    assert judge_answers(answers, names)[1] == 0.25  # without facts only the name counts
    assert judge_answers(["x"], ["Jorna"], aliases=[["x"]])[1] == 1.0
    verdicts, rate = judge_answers([], [])
    assert verdicts == [] and math.isnan(rate)
    with pytest.raises(ValueError):
        judge_answers(["a"], [])
    with pytest.raises(ValueError):
        judge_answers(["a"], ["b"], aliases=[])
