"""MLLMU-Bench's own protocol (`eval/benchmarks/mllmu.py`): letter multiple choice (zero- and
few-shot), generation ROUGE-L and BLEU, cloze, on forget / test / retain / celebrity people for
image and text questions; the Retain_Set loader; and `dsunlearn eval --benchmark mllmu`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dsunlearn.config import EvalConfig
from dsunlearn.data.fixtures import add_mllmu_celebrities
from dsunlearn.data.mllmu import CELEBRITY_DIR, load_benchmark, load_celebrities
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import DataError
from dsunlearn.eval.benchmarks import mllmu as M
from dsunlearn.eval.benchmarks.builtin import MIA_KEY
from dsunlearn.report import validate_report
from tests.conftest import assert_gold_verdicts, run_cli

METRICS = ("mc_acc", "mc_fewshot_acc", "gen_rouge_l", "gen_bleu", "cloze_acc")


def keys(sets=M.SETS) -> set[str]:
    per = {f"{s}_{k}_{m}" for s in sets for k in M.KINDS for m in METRICS}
    return per | {M.NO_LETTER_KEY, MIA_KEY}


@pytest.fixture(scope="module")
def celeb_bench(small_bench, tmp_path_factory) -> Path:
    """The small built-in benchmark plus a Retain_Set of 2 celebrities."""
    out = tmp_path_factory.mktemp("celeb") / "b6"
    shutil.copytree(small_bench, out)
    add_mllmu_celebrities(out, people=2)
    return out


@pytest.fixture(scope="module")
def sets(celeb_bench) -> M.MllmuSets:
    bench = load_benchmark(str(celeb_bench))
    return M.build_mllmu_sets(bench, load_celebrities(str(celeb_bench)), EvalConfig(max_items=0))


# --- Retain_Set -----------------------------------------------------------------------------


def test_celebrities_load_in_the_published_shape(celeb_bench, small_bench):
    table = pq.read_table(celeb_bench / CELEBRITY_DIR)
    assert "images" not in table.column_names and "metadata" not in table.column_names
    people = load_celebrities(str(celeb_bench))
    assert [p.id for p in people] == ["C001", "C002"]
    assert all(len(p.images) == 1 and p.mc_image and p.mc_text and p.cloze for p in people)
    assert load_celebrities(str(small_bench)) == []  # the built-in benchmark has none


def test_broken_retain_set_names_the_column(celeb_bench, tmp_path):
    bad = tmp_path / "b"
    shutil.copytree(celeb_bench, bad)
    table = pq.read_table(bad / CELEBRITY_DIR).drop_columns(["Mask_Task"])
    for f in (bad / CELEBRITY_DIR).iterdir():
        f.unlink()
    pq.write_table(table, bad / CELEBRITY_DIR / "x.parquet")
    with pytest.raises(DataError, match=r"Retain_Set.*missing column 'Mask_Task'"):
        load_celebrities(str(bad))


# --- the items ------------------------------------------------------------------------------


def test_every_set_and_kind_has_items(sets):
    found = set(sets.letter) | {f"{k}_rouge_l" for k in sets.gen} | set(sets.cloze)
    assert found == {k.replace("_bleu", "_rouge_l") for k in keys()} - {
        M.NO_LETTER_KEY,
        MIA_KEY,
    }
    assert sets.omitted == {}
    # image questions carry a picture, text questions none
    for table in (sets.letter, sets.gen, sets.cloze):
        for key, items in table.items():
            kind = key.split("_")[1]
            assert all((it.image is not None) == (kind == "image") for it in items), key


def test_letter_prompts_point_at_the_right_option(sets):
    for key, items in sets.letter.items():
        for it in items:
            last = it.question.split("\n\n")[-1]
            option = next(ln for ln in last.splitlines() if ln.startswith(f"{it.reference}: "))
            assert option and it.letters == "ABCD", key
            assert last.endswith("Answer with the option's letter from the given choices directly.")


def test_few_shot_examples_are_solved_and_about_other_people(celeb_bench):
    bench = load_benchmark(str(celeb_bench))
    asked = M.mc_vqa_examples(bench.retain)
    pool = M.mc_vqa_examples(bench.retain)
    rng = np.random.default_rng(0)
    for item in asked:
        shots = M.pick_shots(item, pool, 2, rng)
        assert len(shots) == 2 and all(s.entity_id != item.entity_id for s in shots)
        prompt = M.letter_prompt(item, shots).question
        blocks = prompt.split("\n\n")
        assert len(blocks) == 3 and all("Correct Answer: " in b for b in blocks[:2])
        assert "Correct Answer" not in blocks[2]


def test_missing_sets_are_omitted_with_a_reason(small_bench):
    bench = load_benchmark(str(small_bench))
    s = M.build_mllmu_sets(bench, [], EvalConfig(max_items=3))
    assert set(s.omitted) == {"celebrity_*"} and "Retain_Set" in s.omitted["celebrity_*"]
    assert not any(k.startswith("celebrity") for k in [*s.letter, *s.gen, *s.cloze])
    assert all(len(v) <= 3 for t in (s.letter, s.gen, s.cloze) for v in t.values())


# --- scoring, with a stand-in for generation ------------------------------------------------


class _Model(torch.nn.Module):
    pass


INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _score(sets, monkeypatch, answer):
    monkeypatch.setattr(M, "generate_answers", lambda m, p, items, *a: [answer(i) for i in items])
    return M.evaluate_mllmu(_Model(), None, sets, EvalConfig(), INFO, zero3=False)


def test_right_answers_score_one(sets, monkeypatch):
    out = _score(
        sets,
        monkeypatch,
        lambda it: f"({it.reference})" if hasattr(it, "letters") else it.reference,
    )
    assert set(out) == keys() - {MIA_KEY}
    for k, v in out.items():
        if k == M.NO_LETTER_KEY:
            assert v == 0.0
        elif k.endswith("_bleu"):  # short references: smoothed BLEU-4 stays below 1
            assert 0.0 < v <= 1.0, k
        else:
            assert v == pytest.approx(1.0), k


def test_wrong_or_formatless_answers_score_zero(sets, monkeypatch):
    def wrong(it):
        if hasattr(it, "letters"):
            return "Answer: " + next(c for c in it.letters if c != it.reference)
        return "nothing at all"

    out = _score(sets, monkeypatch, wrong)
    assert all(v == 0.0 for v in out.values()), out
    out = _score(sets, monkeypatch, lambda it: "I am not sure.")
    assert out[M.NO_LETTER_KEY] == 1.0
    assert all(v == 0.0 for k, v in out.items() if k.endswith("mc_acc"))


def test_cloze_reads_the_ground_truth_anywhere(sets, monkeypatch):
    out = _score(sets, monkeypatch, lambda it: f"it is {getattr(it, 'reference', '')}.")
    assert all(out[k] == 1.0 for k in sets.cloze)


# --- the command ----------------------------------------------------------------------------


def _run(tmp_path, data, model, *extra):
    out = tmp_path / "out"
    args = ["eval", "--benchmark", "mllmu", "--model", str(model), "--data", str(data)]
    proc = run_cli(
        [*args, "--out", str(out), *extra, "max_items=4", "gen_max_new_tokens=4"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    return report, (out / "report.md").read_text()


@pytest.fixture(scope="module")
def every_set(tmp_path_factory, celeb_bench, random_vanilla):
    """The 1-rank report of the random model with itself as vanilla and gold: checked on its
    own and the reference of the 2-rank run (the protocol scores a model alike with or without
    an original: `MllmuProtocol.score` does not read it)."""
    both = ("--vanilla", str(random_vanilla), "--gold", str(random_vanilla))
    return _run(tmp_path_factory.mktemp("every-set"), celeb_bench, random_vanilla, *both)


def test_cli_reports_every_set(every_set, random_vanilla):
    report, md = every_set
    assert_gold_verdicts(report, md)
    (row,) = report["methods"].values()
    assert set(row) == keys() and row == report["vanilla"]  # the same model twice
    assert all(0.0 <= v <= 1.0 for v in row.values()), row
    facts = report["benchmark"]
    assert facts["name"] == "mllmu" and facts["omitted"] == {} and facts["shots"] == M.SHOTS
    assert facts["items"]["celebrity_text_mc_acc"] > 0 and facts["mia"]["members"] > 0
    assert random_vanilla.name == "vanilla"  # a model folder named like the report's own row
    assert list(report["methods"]) == ["vanilla (evaluated)"]
    assert "| metric | vanilla | vanilla (evaluated) |" in md


def test_cli_without_celebrities_says_so(tmp_path, small_bench, random_vanilla):
    report, md = _run(tmp_path, small_bench, random_vanilla)
    (row,) = report["methods"].values()
    assert set(row) == keys(("forget", "test", "retain")) and report["vanilla"] == {}
    assert "not computed: celebrity_*" in md


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_numbers(tmp_path, celeb_bench, random_vanilla, every_set):
    """Items are sharded over ranks and gathered back: 2 ranks on ZeRO-3 must reproduce the
    1-rank report exactly (greedy generation, the same items)."""
    from tests.conftest import run_deepspeed

    one, _ = every_set
    out = tmp_path / "two"
    args = ["eval", "--benchmark", "mllmu", "--model", str(random_vanilla)]
    args += ["--data", str(celeb_bench), "--out", str(out), "max_items=4", "gen_max_new_tokens=4"]
    proc = run_deepspeed(2, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = json.loads((out / "report.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert list(two["methods"]) == list(one["methods"]) == ["vanilla (evaluated)"]
    (a,), (b,) = one["methods"].values(), two["methods"].values()
    assert set(a) == set(b) == keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-6), k
