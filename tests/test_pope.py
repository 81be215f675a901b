"""POPE: the answer rule and metrics on hand-made answers, the loader on the fixture and on bad
input, and `dsunlearn eval --benchmark pope` on a random tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dsunlearn.config import DataConfig, EvalConfig
from dsunlearn.data.examples import GenExample
from dsunlearn.data.faces import Identity
from dsunlearn.data.pope import load_pope, set_name
from dsunlearn.data.utility_fixtures import present_objects, write_pope_fixture
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.eval.benchmarks import build_protocol
from dsunlearn.eval.benchmarks.general import TINY_MODEL_NOTE
from dsunlearn.eval.benchmarks.pope import (
    Confusion,
    PopeSets,
    pope_metrics,
    pope_scores,
    pope_sets,
    pope_yes_no,
)
from dsunlearn.report import validate_report
from tests.conftest import run_cli

PER_FILE = 8
SETS = ("random", "popular", "adversarial")


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pope_fixture(
        tmp_path_factory.mktemp("pope") / "pope", questions_per_file=PER_FILE, images=3
    )


# ---------------------------------------------------------------------------------------------
# The answer rule and the metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, read",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no, there is none", "no"),
        ("No, it is a cat.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes, there is a dog. There is no cat.", "yes"),  # only the first sentence counts
        ("I do not see one", "no"),
        ("Nope", "yes"),  # POPE's script knows only No / no / not ...
        ("NO", "yes"),
        ("nothing", "yes"),  # ... as whole words
        ("No!", "yes"),  # "No!" is not the word "No" (split on spaces only)
        ("", "yes"),  # an empty answer counts as yes
        ("a dog", "yes"),
    ],
)
def test_yes_no_reads_answers_as_popes_script(answer: str, read: str) -> None:
    assert pope_yes_no(answer) == read


def test_metrics_from_hand_counted_confusion() -> None:
    # TP 3, FP 1, TN 2, FN 2
    predicted = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no", "yes", "yes"]
    c = Confusion.of(predicted, labels)
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 1, 2, 2)
    m = c.metrics()
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert m["yes_ratio"] == pytest.approx(4 / 8)
    answers = ["Yes.", "yes", "Sure", "", "No", "no.", "not at all", "No, none"]
    assert pope_metrics(answers, labels) == m  # the raw answers read by the rule


def test_metrics_of_biased_models() -> None:
    labels = ["yes", "no"] * 4
    always_yes = pope_metrics(["Yes"] * 8, labels)
    assert always_yes == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    )
    always_no = pope_metrics(["No"] * 8, labels)  # no "yes" answer: precision and F1 are 0
    assert always_no == {
        "accuracy": 0.5,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }
    perfect = pope_metrics(["Yes" if y == "yes" else "No" for y in labels], labels)
    assert perfect == {
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "yes_ratio": 0.5,
    }
    with pytest.raises(ValueError):
        Confusion.of(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        Confusion.of([], []).metrics()


def test_scores_pool_every_file_and_give_each_file() -> None:
    items = [GenExample("q", y, None, str(i)) for i, y in enumerate(["yes", "no", "yes", "no"])]
    sets = PopeSets(
        "x", items, ["random", "random", "popular", "popular"], {"random": 2, "popular": 2}
    )
    out = pope_scores(sets, ["Yes", "Yes", "No", "No"])
    assert out["pope_accuracy"] == 0.5 and out["pope_yes_ratio"] == 0.5
    assert out["pope_random_accuracy"] == 0.5 and out["pope_random_yes_ratio"] == 1.0
    assert out["pope_popular_accuracy"] == 0.5 and out["pope_popular_yes_ratio"] == 0.0
    assert out["pope_precision"] == 0.5 and out["pope_recall"] == 0.5
    assert set(pope_scores(sets, ["Yes"] * 4, detail=False)) == {
        f"pope_{k}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")
    }
    with pytest.raises(ValueError, match="3 answers for 4"):
        pope_scores(sets, ["Yes"] * 3)


# ---------------------------------------------------------------------------------------------
# Loader and fixture
# ---------------------------------------------------------------------------------------------


def test_fixture_layout_round_trips(pope_dir: Path) -> None:
    assert sorted(p.name for p in pope_dir.glob("coco_pope_*.json")) == sorted(
        f"coco_pope_{s}.json" for s in SETS
    )
    pope = load_pope(pope_dir)
    assert list(pope.sets) == list(SETS)
    info = json.loads((pope_dir / "fixture.json").read_text())
    for name in SETS:
        raw = [
            json.loads(x) for x in (pope_dir / f"coco_pope_{name}.json").read_text().splitlines()
        ]
        assert [list(r) for r in raw] == [["question_id", "image", "text", "label"]] * PER_FILE
        qs = pope.sets[name]
        assert [(q.question_id, q.image, q.text, q.label) for q in qs] == [
            (str(r["question_id"]), r["image"], r["text"], r["label"]) for r in raw
        ]
        assert [q.label for q in qs].count("yes") == PER_FILE // 2
        for q in qs:  # the fixture tells the truth about its pictures
            shown = present_objects(Identity(**info["pictures"][q.image]))
            obj = (
                q.text.removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")
            )
            obj = obj.removeprefix("pair of ")
            assert (obj in shown) == (q.label == "yes"), q
            assert q.text.startswith("Is there a")
    image = pope.image(pope.sets["random"][0].image)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_fixture_is_deterministic(pope_dir: Path, tmp_path: Path) -> None:
    again = write_pope_fixture(tmp_path / "again", questions_per_file=PER_FILE, images=3)
    for f in sorted(p.relative_to(pope_dir) for p in pope_dir.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (pope_dir / f).read_bytes(), f


def test_other_layouts_are_read(pope_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "p"
    (folder / "val2014").mkdir(parents=True)  # LLaVA's layout: pictures in val2014/
    for im in (pope_dir / "images").iterdir():
        shutil.copy(im, folder / "val2014" / im.name)
    lines = (pope_dir / "coco_pope_random.json").read_text().splitlines()
    (folder / "coco_pope_random.jsonl").write_text("\n".join(lines) + "\n\n")
    array = [json.loads(x) for x in lines]
    (folder / "gqa_pope_popular.json").write_text(json.dumps(array))
    pope = load_pope(folder)
    assert list(pope.sets) == ["random", "gqa_popular"]
    assert len(pope.sets["random"]) == len(pope.sets["gqa_popular"]) == PER_FILE
    assert set_name("coco_pope_adversarial.json") == "adversarial"
    assert set_name("coco_pope_random_answers.json") is None


def _copy(pope_dir: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(pope_dir, bad)
    return bad


def _rewrite(path: Path, line: int, change: dict | str) -> None:
    lines = path.read_text().splitlines()
    lines[line] = (
        change if isinstance(change, str) else json.dumps({**json.loads(lines[line]), **change})
    )
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": "maybe"}, "line 2: label must be 'yes' or 'no', got 'maybe'"),
        ({"image": "nowhere.png"}, "line 2: image 'nowhere.png' not found (looked in"),
        ({"text": ""}, "line 2: 'text' must be a non-empty string"),
        ("{oops", "line 2: not valid JSON"),
        (
            '{"question_id": 1, "image": "x.png", "text": "Is there?"}',
            "line 2: missing key 'label'",
        ),
        ("[1, 2]", "line 2: expected a JSON object"),
    ],
)
def test_bad_lines_are_one_line_errors(
    pope_dir: Path, tmp_path: Path, change: dict | str, message: str
) -> None:
    bad = _copy(pope_dir, tmp_path)
    f = bad / "coco_pope_popular.json"
    _rewrite(f, 1, change)
    with pytest.raises(DataError) as err:
        load_pope(bad)
    assert str(err.value).startswith(f"{f} {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_folder_files_and_pictures(pope_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere: POPE folder not found"):
        load_pope(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no POPE question file \(coco_pope_random.json"):
        load_pope(tmp_path / "empty")
    bad = _copy(pope_dir, tmp_path)
    (bad / "coco_pope_random.json").write_text("\n")
    with pytest.raises(DataError, match="coco_pope_random.json: no question"):
        load_pope(bad)
    bad2 = _copy(pope_dir, tmp_path / "2")
    (bad2 / "coco_pope_random.jsonl").write_text("")
    with pytest.raises(DataError, match="two question files for POPE set 'random'"):
        load_pope(bad2)
    bad3 = _copy(pope_dir, tmp_path / "3")
    name = load_pope(bad3).sets["random"][0].image
    (bad3 / "images" / name).write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"{name}: undecodable image"):
        pope_sets(load_pope(bad3), EvalConfig())


def test_protocol_sets_cap_and_no_validation_split(pope_dir: Path) -> None:
    protocol = build_protocol("pope", DataConfig(), EvalConfig(path=str(pope_dir), max_items=3))
    assert protocol.forget_key is None and protocol.retain_key is None
    sets = protocol.build("test")
    assert sets.questions == {s: 3 for s in SETS} and sets.in_files == {s: PER_FILE for s in SETS}
    assert len(sets.items) == 9 and sets.set_of == [s for s in SETS for _ in range(3)]
    assert all(it.reference in ("yes", "no") and it.image is not None for it in sets.items)
    with pytest.raises(ConfigError) as err:
        protocol.build("val")
    assert "POPE has no validation split" in str(err.value) and "\n" not in str(err.value)
    facts = protocol.facts(sets, with_original=False)
    assert facts["chance"] == 0.5 and TINY_MODEL_NOTE in facts["notes"]


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_eval_pope(tmp_path: Path, pope_dir: Path, random_vanilla: Path) -> None:
    out = tmp_path / "out"
    args = ["eval", "--benchmark", "pope", "--model", str(random_vanilla), "--out", str(out)]
    proc = run_cli(
        [*args, f"eval.path={pope_dir}", "max_items=4", "gen_max_new_tokens=3"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    (row,) = report["methods"].values()
    keys = {f"pope_{k}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    keys |= {f"pope_{s}_{k[5:]}" for s in SETS for k in keys}
    assert set(row) == keys
    assert all(0.0 <= v <= 1.0 for v in row.values()), row
    # Every file asks 4 questions: the pooled accuracy and yes-ratio are the files' means.
    for k in ("accuracy", "yes_ratio"):
        per_file = [row[f"pope_{s}_{k}"] for s in SETS]
        assert row[f"pope_{k}"] == pytest.approx(sum(per_file) / 3)
    bench = report["benchmark"]
    assert bench["name"] == "pope" and bench["data"] == str(pope_dir)
    assert bench["questions"] == {s: 4 for s in SETS} and report["chance"] == 0.5
    md = (out / "report.md").read_text()
    assert "Benchmark: pope" in md and "these scores mean little" in md and "chance 0.5" in md
