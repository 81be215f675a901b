"""MMBench: option parsing and circular evaluation on hand-made answers, the TSV loader on the
fixture and on bad input, and `dsunlearn eval --benchmark mmbench` on a random tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dsunlearn.config import DataConfig, EvalConfig
from dsunlearn.data.mmbench import COPY_OFFSET, LETTERS, load_mmbench
from dsunlearn.data.utility_fixtures import TSV_COLUMNS, write_mmbench_fixture
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.eval.benchmarks import build_protocol
from dsunlearn.eval.benchmarks.general import TINY_MODEL_NOTE
from dsunlearn.eval.benchmarks.mmbench import (
    INSTRUCTION,
    chance,
    circular_accuracy,
    mmbench_prompt,
    mmbench_scores,
    mmbench_sets,
    parse_option,
    rotate,
)
from dsunlearn.report import validate_report
from tests.conftest import run_cli

N = 10  # fixture questions: kinds with 4, 4, 3, 2, 4 options, twice
OPTION_COUNTS = [4, 4, 3, 2, 4] * 2
OPTIONS = ["dog", "cat", "black cat", "bird"]


@pytest.fixture(scope="module")
def tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmbench_fixture(tmp_path_factory.mktemp("mmb") / "dev.tsv", questions=N)


# ---------------------------------------------------------------------------------------------
# Option parsing, rotation, circular evaluation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, picked",
    [
        ("B", 1),
        ("B.", 1),
        ("(B)", 1),
        ("B)", 1),
        (" **C** ", 2),
        ("The answer is B", 1),
        ("the answer is (D).", 3),
        ("Answer: C", 2),
        ("Option D", 3),
        ("B. cat", 1),
        ("(A) dog", 0),
        ("I think it is B", 1),  # "I" followed by a word is the pronoun
        ("A", 0),
        ("It is D", 3),
        ("dog", 0),  # the option's text
        ("A cat.", 1),  # "A" + lowercase word is the article: text "cat"
        ("It is a black cat", 2),  # "cat" lies inside "black cat": the longer one
        ("a Dog, surely", 0),
        ("B or C", None),  # two letters
        ("(A) or (B)", None),
        ("dog and bird", None),  # two options' texts
        ("E", None),  # not one of the four letters
        ("b", None),  # lowercase is not a letter
        ("catalogue", None),  # whole words only
        ("", None),
        ("USER <unk> the", None),
    ],
)
def test_parse_option(answer: str, picked: int | None) -> None:
    assert parse_option(answer, OPTIONS) == picked


def test_parse_option_only_reads_the_questions_letters() -> None:
    assert parse_option("C", ["yes", "no"]) is None
    assert parse_option("The answer is C", ["yes", "no", "maybe"]) == 2
    assert parse_option("No", ["Yes", "No"]) == 1


def test_rotations_move_the_right_answer_with_its_text() -> None:
    options = ("w", "x", "y", "z")
    seen = []
    for shift in range(4):
        rotated, answer = rotate(options, 2, shift)
        assert rotated[answer] == "y" and sorted(rotated) == list(options)
        seen.append(rotated)
    assert seen[1] == ("x", "y", "z", "w") and len(set(seen)) == 4
    assert rotate(options, 0, 4) == (options, 0)


def test_circular_accuracy_needs_every_pass() -> None:
    assert circular_accuracy([[True, True, True], [True, False, True], [True]]) == pytest.approx(
        2 / 3
    )
    assert circular_accuracy([[False, True]]) == 0.0
    with pytest.raises(ValueError):
        circular_accuracy([[]])


def _sets(tsv: Path, circular: bool):
    return mmbench_sets(load_mmbench(tsv), EvalConfig(mmbench_circular=circular))


def test_scores_on_hand_made_answers(tsv: Path) -> None:
    sets = _sets(tsv, circular=True)
    assert len(sets.items) == sum(OPTION_COUNTS)
    # Question 0: every pass right (letter); question 1: only the first pass right; question 2:
    # every pass right by the option's text; every other answer unreadable.
    answers = []
    for qi, options, right in zip(sets.question_of, sets.options, sets.answers, strict=True):
        first = len(answers) == sets.question_of.index(qi)
        if qi == 0 or (qi == 1 and first):
            answers.append(f"The answer is {LETTERS[right]}")
        elif qi == 1:
            answers.append(LETTERS[(right + 1) % len(options)])
        elif qi == 2:
            answers.append(f"It is {options[right]}.")
        else:
            answers.append("hmm")
    out = mmbench_scores(sets, answers)
    assert out["mmbench_accuracy"] == pytest.approx(3 / N)
    assert out["mmbench_circular_accuracy"] == pytest.approx(2 / N)
    unread = sum(OPTION_COUNTS[3:])
    assert out["mmbench_unparsed_rate"] == pytest.approx(unread / len(answers))
    # 8 attribute_recognition questions (0, 1, 2 among them), 2 celebrity_recognition (4, 9)
    assert out["mmbench_category_attribute_recognition_accuracy"] == pytest.approx(2 / 8)
    assert out["mmbench_category_celebrity_recognition_accuracy"] == 0.0
    assert out["mmbench_l2_coarse_perception_accuracy"] == 0.0
    assert out["mmbench_l2_finegrained_perception_instance_level_accuracy"] == pytest.approx(2 / 8)
    brief = mmbench_scores(sets, answers, detail=False)
    assert set(brief) == {"mmbench_accuracy", "mmbench_circular_accuracy", "mmbench_unparsed_rate"}


def test_one_pass_without_circular(tsv: Path) -> None:
    sets = _sets(tsv, circular=False)
    assert len(sets.items) == N and sets.question_of == list(range(N))
    bench = load_mmbench(tsv)
    assert sets.options == [q.options for q in bench.questions]  # the published order
    answers = [LETTERS[a] for a in sets.answers]
    out = mmbench_scores(sets, answers)
    assert out["mmbench_accuracy"] == 1.0 and "mmbench_circular_accuracy" not in out
    assert chance(sets) == pytest.approx(sum(1 / k for k in OPTION_COUNTS) / N)
    circ = _sets(tsv, circular=True)
    assert chance(circ) == pytest.approx(sum((1 / k) ** k for k in OPTION_COUNTS) / N)


def test_prompt_has_hint_question_options_and_instruction(tsv: Path) -> None:
    q = load_mmbench(tsv).questions[3]  # the glasses question, with a hint and 2 options
    assert q.hint and len(q.options) == 2
    assert mmbench_prompt(q, ("No", "Yes")).split("\n") == [
        q.hint,
        q.question,
        "A. No",
        "B. Yes",
        INSTRUCTION,
    ]
    assert mmbench_prompt(load_mmbench(tsv).questions[0], ("a", "b")).startswith(
        "What colour is the person's shirt?\nA. a\n"
    )


# ---------------------------------------------------------------------------------------------
# Loader and fixture
# ---------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _write(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in (columns or list(rows[0]))} for r in rows])
    return path


def test_fixture_round_trips(tsv: Path) -> None:
    rows = _rows(tsv)
    assert list(rows[0]) == list(TSV_COLUMNS)
    bench = load_mmbench(tsv)
    assert [len(q.options) for q in bench.questions] == OPTION_COUNTS
    for q, r in zip(bench.questions, rows, strict=True):
        assert str(q.index) == r["index"] and q.question == r["question"] and q.hint == r["hint"]
        assert list(q.options) == [r[c] for c in "ABCD" if r[c]]
        assert q.answer_letter == r["answer"] and q.category == r["category"]
        assert q.l2_category == r["l2-category"] and q.split == "dev"
        assert all(not r[c] for c in "ABCD"[len(q.options) :])  # unused options empty
        im = bench.image(q.index)
        assert im.mode == "RGB" and im.size == (32, 32)
    people = {q.options[q.answer] for q in bench.questions if q.category == "celebrity_recognition"}
    assert len(people) == 2  # two different built-in people
    again = write_mmbench_fixture(tsv.parent / "again.tsv", questions=N)
    assert again.read_bytes() == tsv.read_bytes()
    assert json.loads(Path(f"{again}.json").read_text())["questions"] == N


def test_circular_copies_are_left_out(tmp_path: Path, tsv: Path) -> None:
    with_copies = write_mmbench_fixture(tmp_path / "c.tsv", questions=N, circular_copies=True)
    rows = _rows(with_copies)
    copies = [r for r in rows if int(r["index"]) >= COPY_OFFSET]
    assert len(copies) == sum(k - 1 for k in OPTION_COUNTS)
    for c in copies:  # VLMEvalKit's convention: a copy's picture is its original's index
        assert c["image"] == str(int(c["index"]) % COPY_OFFSET)
    bench = load_mmbench(with_copies)
    assert bench.copies_skipped == len(copies)
    assert [q.options for q in bench.questions] == [q.options for q in load_mmbench(tsv).questions]
    # A row whose picture is another row's index (a reference) gets that picture.
    rows = [r for r in rows if int(r["index"]) < COPY_OFFSET]
    rows[1]["image"] = rows[0]["image"][:0] + "0"
    bench = load_mmbench(_write(tmp_path / "ref.tsv", rows))
    assert bench.image(1).tobytes() == bench.image(0).tobytes()


def test_folder_with_one_tsv(tmp_path: Path, tsv: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.tsv").write_bytes(tsv.read_bytes())
    assert len(load_mmbench(tmp_path / "one").questions) == N
    (tmp_path / "one" / "y.tsv").write_bytes(tsv.read_bytes())
    with pytest.raises(DataError, match="needs exactly one MMBench .tsv file, found x.tsv, y.tsv"):
        load_mmbench(tmp_path / "one")
    with pytest.raises(DataError, match="nowhere.tsv: MMBench TSV not found"):
        load_mmbench(tmp_path / "nowhere.tsv")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda rows: rows[2].update(answer="D"),
            "row index 2: answer 'D' is not one of its option letters A-C",
        ),
        (lambda rows: rows[0].update(answer=""), "row index 0: answer '' is not one of"),
        (lambda rows: rows[0].update(C=""), "row index 0: option C is empty but option D is not"),
        (lambda rows: rows[3].update(B="nan"), "row index 3: needs at least options A and B"),
        (lambda rows: rows[1].update(index="0"), "row index 0: index appears twice"),
        (lambda rows: rows[1].update(index="one"), "row 2: index must be an integer, got 'one'"),
        (lambda rows: rows[4].update(question=""), "row index 4: empty question"),
        (lambda rows: rows[4].update(image=""), "row index 4: empty image"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path: Path, tsv: Path, edit, message: str) -> None:
    rows = _rows(tsv)
    edit(rows)
    bad = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError) as err:
        load_mmbench(bad)
    assert str(err.value).startswith(f"{bad} {message}"), str(err.value)


def test_missing_columns_and_bad_pictures(tmp_path: Path, tsv: Path) -> None:
    rows = _rows(tsv)
    no_answer = _write(tmp_path / "test.tsv", rows, [c for c in TSV_COLUMNS if c != "answer"])
    with pytest.raises(DataError) as err:
        load_mmbench(no_answer)
    assert str(err.value) == (
        f"{no_answer}: missing column 'answer' (MMBench's test TSVs hide the answers: score a "
        "dev TSV)"
    )
    no_image = _write(tmp_path / "noimg.tsv", rows, [c for c in TSV_COLUMNS if c != "image"])
    with pytest.raises(DataError, match="missing column 'image'"):
        load_mmbench(no_image)
    rows[5]["image"] = "bm90IGEgcGljdHVyZQ=="  # base64 of "not a picture"
    bad = _write(tmp_path / "bad.tsv", rows)
    bench = load_mmbench(bad)  # pictures are decoded when asked for
    with pytest.raises(DataError, match=r"bad.tsv row index 5: undecodable image"):
        bench.image(5)
    with pytest.raises(DataError, match="row index 5: undecodable image"):
        mmbench_sets(bench, EvalConfig())


def test_protocol_cap_and_no_validation_split(tsv: Path) -> None:
    cfg = EvalConfig(path=str(tsv), max_items=4, mmbench_circular=True)
    protocol = build_protocol("mmbench", DataConfig(), cfg)
    assert protocol.forget_key is None and protocol.retain_key is None
    sets = protocol.build("test")
    assert len(sets.questions) == 4 and sets.in_file == N
    assert len(sets.items) == sum(len(q.options) for q in sets.questions)
    with pytest.raises(ConfigError) as err:
        protocol.build("val")
    assert "MMBench has no validation split" in str(err.value) and "\n" not in str(err.value)
    facts = protocol.facts(sets, with_original=False)
    assert facts["circular"] and TINY_MODEL_NOTE in facts["notes"]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_eval_mmbench_circular(tmp_path: Path, tsv: Path, random_vanilla: Path) -> None:
    out = tmp_path / "out"
    args = ["eval", "--benchmark", "mmbench", "--model", str(random_vanilla), "--data", str(tsv)]
    extra = ["--out", str(out), "mmbench_circular=true", "gen_max_new_tokens=3"]
    proc = run_cli([*args, *extra], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    (row,) = report["methods"].values()
    assert {"mmbench_accuracy", "mmbench_circular_accuracy", "mmbench_unparsed_rate"} <= set(row)
    assert "mmbench_category_celebrity_recognition_accuracy" in row
    assert all(0.0 <= v <= 1.0 for v in row.values()), row
    assert row["mmbench_circular_accuracy"] <= row["mmbench_accuracy"]
    bench = report["benchmark"]
    assert bench["questions"] == N and bench["prompts"] == sum(OPTION_COUNTS)
    assert bench["circular"] is True and report["chance"] < 0.25
    assert "these scores mean little" in (out / "report.md").read_text()
