"""`dsunlearn eval --benchmark {builtin,clear,mmubench}`: each benchmark's own protocol, run
through the CLI as a user would (1 rank, a random tiny model, small fixtures)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsunlearn.eval.benchmarks import builtin as B
from dsunlearn.eval.benchmarks import clear as C
from dsunlearn.eval.benchmarks import membership
from dsunlearn.eval.benchmarks import mmubench as U
from dsunlearn.eval.judge import JUDGE_NAME
from dsunlearn.eval.mia import concept_kl
from dsunlearn.report import validate_report
from tests.conftest import assert_gold_verdicts, run_cli

SMALL = ["max_items=6", "gen_max_new_tokens=4"]

CLEAR_KEYS = {
    "forget_name_mc_acc",
    "retain_name_mc_acc",
    "real_faces_acc",
    "real_world_acc",
    "forget_caption_rouge_l",
    "retain_caption_rouge_l",
    "forget_text_qa_rouge_l",
    "retain_text_qa_rouge_l",
    C.MIA_KEY,
}
MMU_KEYS = {
    "eff",
    "gen",
    "div",
    "flu",
    "jailbreak_leak_rate",
    "jailbreak_multilingual_leak_rate",
    "jailbreak_multi_hop_leak_rate",
    U.MIA_KEY,
}
BUILTIN_KEYS = {
    "forget_vqa_acc",
    "retain_vqa_acc",
    "forget_heldout_vqa_acc",
    "retain_heldout_vqa_acc",
    "forget_text_qa_acc",
    "retain_text_qa_acc",
    "forget_gen_rouge_l",
    "retain_gen_rouge_l",
    "eff",
    "gen",
    "div",
    "flu",
    B.MIA_KEY,
}


@pytest.fixture(scope="module")
def clear_dir(tmp_path_factory):
    from dsunlearn.data.fixtures import write_clear_fixture

    return write_clear_fixture(tmp_path_factory.mktemp("clear") / "clear", entities=6)


@pytest.fixture(scope="module")
def mmu_dir(tmp_path_factory):
    from dsunlearn.data.fixtures import write_mmubench_fixture

    return write_mmubench_fixture(tmp_path_factory.mktemp("mmu") / "mmu", concepts=2)


@pytest.fixture(scope="module")
def mmu_vanilla(tmp_path_factory, mmu_dir, random_vanilla):
    """The 1-rank MMUBench report of the random model with itself as vanilla: checked on its own
    and the reference of the 2-rank run."""
    tmp = tmp_path_factory.mktemp("mmu-vanilla")
    return _eval(tmp, "mmubench", random_vanilla, mmu_dir, "--vanilla", str(random_vanilla))


def _eval(tmp_path, benchmark, model, data, *extra):
    out = tmp_path / f"out-{benchmark}"
    args = ["eval", "--benchmark", benchmark, "--model", str(model), "--data", str(data)]
    proc = run_cli([*args, "--out", str(out), *extra, *SMALL], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert (out / "report.png").stat().st_size > 1000
    assert report["world_size"] == 1 and report["benchmark"]["name"] == benchmark
    return report, (out / "report.md").read_text()


def _unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


def test_clear(tmp_path, clear_dir, random_vanilla):
    report, md = _eval(
        tmp_path,
        "clear",
        random_vanilla,
        clear_dir,
        "--vanilla",
        str(random_vanilla),
        "--gold",
        str(random_vanilla),
    )
    (row,) = report["methods"].values()
    assert set(row) == CLEAR_KEYS and set(report["vanilla"]) == CLEAR_KEYS
    assert all(_unit(v) for v in row.values()), row
    assert row == report["vanilla"]  # the same model twice
    assert_gold_verdicts(report, md)
    assert report["benchmark"]["split"] == "test"
    assert report["benchmark"]["split_rule"].startswith("hash: ")
    assert report["benchmark"]["forget_pct"] == 10
    assert "forget10_perturbed" in report["benchmark"]["configs"]
    assert "Benchmark: clear" in md and "forget_name_mc_acc" in md
    _assert_mia(report, C.MIA_KEY)


def test_mmubench_with_vanilla(mmu_vanilla):
    report, md = mmu_vanilla
    (row,) = report["methods"].values()
    assert set(row) == MMU_KEYS | {"mia_rouge_l_recall", "c_dis"}
    assert set(report["vanilla"]) == MMU_KEYS
    assert report["judge"] == JUDGE_NAME == report["benchmark"]["judge"]
    assert f"jailbreak judge: {JUDGE_NAME}" in md
    # The model is its own original: it reproduces its answers, and its concept tokens keep
    # their probabilities.
    assert row["mia_rouge_l_recall"] == pytest.approx(1.0)
    assert row["c_dis"] == pytest.approx(0.0, abs=1e-6)
    for key in MMU_KEYS - {"flu"}:
        assert _unit(row[key]), (key, row[key])
    assert row["flu"] >= 1.0
    _assert_mia(report, U.MIA_KEY)


def test_mmubench_without_vanilla_says_what_is_omitted(tmp_path, mmu_dir, random_vanilla):
    report, md = _eval(tmp_path, "mmubench", random_vanilla, mmu_dir)
    (row,) = report["methods"].values()
    assert set(row) == MMU_KEYS and report["vanilla"] == {}
    assert set(report["benchmark"]["omitted"]) == {"mia_rouge_l_recall", "c_dis"}
    assert "not computed: c_dis" in md
    _assert_mia(report, U.MIA_KEY)


def _assert_mia(report: dict, key: str) -> None:
    (row,) = report["methods"].values()
    assert _unit(row[key]), (key, row[key])
    mia = report["benchmark"]["mia"]
    assert mia["key"] == key and mia["k_pct"] == membership.MINK_K
    assert mia["members"] > 0 and mia["nonmembers"] > 0


def test_builtin_adds_membership_inference(tmp_path, small_bench, random_vanilla):
    report, _ = _eval(tmp_path, "builtin", random_vanilla, small_bench)
    (row,) = report["methods"].values()
    assert set(row) == BUILTIN_KEYS
    assert _unit(row[B.MIA_KEY])
    mia = report["benchmark"]["mia"]
    assert mia["key"] == B.MIA_KEY and mia["members"] > 0 and mia["nonmembers"] > 0
    assert "judge" not in report


def _image_bytes(image) -> bytes:
    return image.tobytes()


def test_clear_mia_sets_pair_each_picture_with_true_and_perturbed_captions(clear_dir):
    from dsunlearn.config import DataConfig, EvalConfig
    from dsunlearn.data import clear

    def mia_sets(max_items: int):
        data = DataConfig(path=str(clear_dir), forget_pct=10)
        return C.ClearProtocol(data, EvalConfig(max_items=max_items)).mia_sets("forget10", "test")

    rows = clear.load_clear(str(clear_dir), "forget10_perturbed", split="test").captions
    sets = mia_sets(0)
    assert rows and all(r.perturbed_captions for r in rows)
    assert len(sets.members) == len(rows)
    assert len(sets.nonmembers) == sum(len(r.perturbed_captions) for r in rows)
    true = {r.caption for r in rows}
    by_image = {_image_bytes(m.image): m for m in sets.members}
    for m, r in zip(sets.members, rows, strict=True):
        assert (m.question, m.answer, m.entity_id) == (C.CAPTION_PROMPT, r.caption, r.name)
    for n in sets.nonmembers:
        member = by_image[_image_bytes(n.image)]  # the same picture as a member
        assert n.question == C.CAPTION_PROMPT and n.entity_id == member.entity_id
        assert n.answer != member.answer and n.answer not in true
    capped = mia_sets(2)
    assert len(capped.members) == min(2, len(rows)) and len(capped.nonmembers) == 2


def test_mmubench_mia_sets_ask_the_same_facts_about_train_and_test_images(mmu_dir):
    from dsunlearn.config import EvalConfig
    from dsunlearn.data.mmubench import load_mmubench

    bench = load_mmubench(str(mmu_dir))
    sets = U.facts_mia_sets(bench, EvalConfig(max_items=0))
    assert all(c.facts for c in bench.concepts)
    assert len(sets.members) == sum(len(c.facts) for c in bench.concepts)
    assert len(sets.nonmembers) == sum(len(c.facts) * len(c.test_images) for c in bench.concepts)
    concepts = {c.id: c for c in bench.concepts}
    train = {c.id: _image_bytes(c.train_image) for c in bench.concepts}
    for m in sets.members:
        assert (m.question, m.answer) in concepts[m.entity_id].facts
        assert _image_bytes(m.image) == train[m.entity_id]
    member_text = {(m.entity_id, m.question, m.answer) for m in sets.members}
    for n in sets.nonmembers:
        assert (n.entity_id, n.question, n.answer) in member_text  # same text ...
        tests = [_image_bytes(im) for im in concepts[n.entity_id].test_images]
        assert _image_bytes(n.image) in tests  # ... about a never-trained picture
    capped = U.facts_mia_sets(bench, EvalConfig(max_items=3))
    assert len(capped.members) == len(capped.nonmembers) == 3


def test_mmubench_mia_sets_empty_without_facts(mmu_dir):
    from dataclasses import replace

    from dsunlearn.config import EvalConfig
    from dsunlearn.data.mmubench import load_mmubench

    bench = load_mmubench(str(mmu_dir))
    bare = replace(bench, concepts=[replace(c, facts=[]) for c in bench.concepts])
    sets = U.facts_mia_sets(bare, EvalConfig(max_items=0))
    assert sets.members == [] and sets.nonmembers == []
    # Nothing to compare: no metric (the report lists it under `omitted`), and no model call.
    assert membership.mia_mink_auc(None, None, sets, EvalConfig(), None, U.MIA_KEY) == {}


def _error_args(tmp_path, folder, model, benchmark, *extra) -> list[str]:
    args = ["eval", "--benchmark", benchmark, "--model", str(model), "--data", str(folder)]
    return [*args, "--out", str(tmp_path / "o"), *extra]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dsunlearn: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "benchmark, data, extra, message",
    [
        ("nope", "clear", [], "unknown benchmark 'nope'"),  # before the ranks join
        ("clear", "mmu", [], "config folder not found"),
        ("clear", "clear", ["--forget-pct", "15"], "CLEAR forget percentage must be one of"),
        ("mmubench", "clear", [], "concepts: folder not found"),
    ],
)
def test_errors(
    tmp_path,
    monkeypatch,
    capsys,
    clear_dir,
    mmu_dir,
    random_vanilla,
    benchmark,
    data,
    extra,
    message,
):
    """`dsunlearn eval` in this process: exit 2 and one line, no report. All but the unknown
    benchmark are found after the ranks joined; here a 1-rank DistInfo stands in for the process
    group, which pytest's process must not join (the real one: the fresh process below)."""
    from dsunlearn.cli import main
    from dsunlearn.engine.dist import DistInfo
    from dsunlearn.recipes import evaluate_model

    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    monkeypatch.setattr(evaluate_model, "init_distributed", lambda: one)
    monkeypatch.chdir(tmp_path)
    folder = {"clear": clear_dir, "mmu": mmu_dir}[data]
    with pytest.raises(SystemExit) as e:
        main(_error_args(tmp_path, folder, random_vanilla, benchmark, *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    assert message in _one_error_line(err)
    assert not (tmp_path / "o" / "report.json").exists()


def test_error_after_the_ranks_joined_is_exit_2_and_one_line_in_a_fresh_process(
    tmp_path, mmu_dir, random_vanilla
):
    """As a user sees it: the process joined its (1-rank) group before the data was read."""
    proc = run_cli(_error_args(tmp_path, mmu_dir, random_vanilla, "builtin"), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "split folder not found" in _one_error_line(proc.stderr)
    assert not (tmp_path / "o" / "report.json").exists()


def test_c_dis_is_concept_kl_of_the_full_distributions():
    g = torch.Generator().manual_seed(0)
    ref, ev = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    ids = [3, 7, 11]
    coarse_ref = [U.coarse_logprobs(x, ids) for x in ref]
    coarse_ev = [U.coarse_logprobs(x, ids) for x in ev]
    expected = concept_kl(ref, ev, ids).mean().item()
    assert U.c_dis(coarse_ref, coarse_ev) == pytest.approx(expected, rel=1e-5)
    assert U.c_dis(coarse_ref, coarse_ref) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(U.c_dis([], []))


@pytest.mark.slow
def test_mmubench_two_ranks_give_the_one_rank_numbers(
    tmp_path, mmu_dir, random_vanilla, mmu_vanilla
):
    """Generation, C-Dis's teacher-forced rows and min-k% scores are sharded over ranks and
    gathered back: 2 ranks on ZeRO-3 must reproduce the 1-rank report (the same arguments)."""
    from tests.conftest import run_deepspeed

    one, _ = mmu_vanilla
    out = tmp_path / "two"
    args = ["eval", "--benchmark", "mmubench", "--model", str(random_vanilla), "--data"]
    args += [str(mmu_dir), "--vanilla", str(random_vanilla), "--out", str(out), *SMALL]
    proc = run_deepspeed(2, args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = json.loads((out / "report.json").read_text())
    assert two["world_size"] == 2
    for row in ("vanilla", "methods"):
        a = one[row] if row == "vanilla" else next(iter(one[row].values()))
        b = two[row] if row == "vanilla" else next(iter(two[row].values()))
        assert set(a) == set(b) and U.MIA_KEY in a
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (row, k)
