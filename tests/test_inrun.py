"""In-run evaluation, selection and early stopping on real ranks (`eval.every`, `select.*`,
`early_stop.patience`), as a user launches them.

One setting throughout: GA for 8 iterations, the validation split every 2, `gold_first` with
targets every step meets (margin 1, retain share 0), so the first evaluated step (2) is
selected, and patience 2 stops the method after step 6. The selected weights are therefore not
the last ones, and the run must put them back (`engine/snapshot.py`) before the test split and
the final checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsunlearn.engine.preempt import PREEMPTED_EXIT
from tests.conftest import REPO, run_cli, run_deepspeed, unlearn_args

pytestmark = pytest.mark.slow

SETTING = (
    "methods=[ga]",
    "optim.steps=8",
    "optim.batch_size=4",
    "eval.every=2",
    "eval.max_items=24",
    "select.criterion=gold_first",
    "select.forget_margin=1.0",
    "select.retain_share=0.0",
    "early_stop.patience=2",
    "checkpoint.final=true",
)


def _args(out: Path, bench: Path, vanilla: Path, name: str, *extra: str) -> list[str]:
    # the random vanilla model doubles as the gold model: the gold path runs, cheaply
    return unlearn_args(out, bench, vanilla, *SETTING, f"gold={vanilla}", *extra, name=name)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "ga"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> str:
    """A reference cache shared by the 2-rank runs of the clean benchmark: the run that is
    stopped and resumed reads the uninterrupted run's vanilla and gold scores."""
    return f"eval.reference_cache={tmp_path_factory.mktemp('refs')}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, small_bench, random_vanilla, refs) -> Path:
    """The uninterrupted 2-rank run, tracked to TensorBoard."""
    out = tmp_path_factory.mktemp("inrun")
    args = _args(out, small_bench, random_vanilla, "full", "report_to=[tensorboard]", refs)
    _ok(run_deepspeed(2, args, cwd=REPO))
    return out / "full"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, small_bench, random_vanilla) -> Path:
    """The same run on 1 rank, on a copy of the benchmark whose test split has wrong answers:
    neither the world size nor the test split may change what in-run evaluation sees."""
    out = tmp_path_factory.mktemp("inrun1")
    bad = _corrupt_test_answers(small_bench, out / "bad")
    _ok(run_cli(_args(out, bad, random_vanilla, "one"), out))
    return out / "one"


def test_selection_early_stop_and_report(two_ranks):
    report = _report(two_ranks)
    sel = report["selection"]["ga"]
    assert sel["criterion"] == "gold_first" and sel["met_targets"] is True
    assert sel["step"] == 2 and sel["steps_run"] == 6 and sel["early_stopped"] is True
    curve = report["curves"]["ga"]
    assert [p["step"] for p in curve] == [2, 4, 6]
    assert sel["val"] == {k: v for k, v in curve[0].items() if k != "step"}
    assert set(curve[0]) == {
        "step",
        "forget_vqa_acc",
        "retain_vqa_acc",
        "forget_text_qa_acc",
        "retain_text_qa_acc",
    }
    # the reference rows: gold on test and validation, forget quality for every row
    assert set(report["val"]) == {"vanilla", "gold"} and report["gold"]
    for row in ("vanilla", "ga"):
        q = report["vs_gold"][row]["forget_quality"]
        assert 0.0 <= q["p_value"] <= 1.0 and q["n"] == q["n_gold"] > 0
    # the gold model is the vanilla model here: identical truth ratios, p-value 1
    assert report["vs_gold"]["vanilla"]["forget_quality"]["p_value"] == pytest.approx(1.0)
    assert len(json.loads((two_ranks / "losses.json").read_text())["ga"]) == 6
    final = two_ranks / "checkpoints" / "ga"
    tag = (final / "latest").read_text().strip()
    assert tag == "step6-selected2"
    meta = json.loads((final / tag / "dsunlearn.json").read_text())
    assert meta["step"] == 6 and meta["selected_step"] == 2
    assert (two_ranks / "curves.png").stat().st_size > 1000
    md = (two_ranks / "report.md").read_text()
    assert "## Selected steps" in md and "## Against the gold model" in md and "| gold |" in md


def test_the_final_checkpoint_holds_the_selected_steps_weights(
    tmp_path, two_ranks, small_bench, random_vanilla
):
    """A run that stops at step 2 without in-run evaluation ends on the weights the selection
    run put back (in-run evaluation does not change the training trajectory)."""
    args = unlearn_args(
        tmp_path,
        small_bench,
        random_vanilla,
        "methods=[ga]",
        "optim.steps=2",
        "optim.batch_size=4",
        "eval.enabled=false",
        "checkpoint.final=true",
        name="to2",
    )
    _ok(run_deepspeed(2, args, cwd=REPO))
    assert _max_diff(_final_weights(tmp_path / "to2"), _final_weights(two_ranks)) == 0.0


def test_one_and_two_ranks_give_the_same_curves_whatever_the_test_split_says(two_ranks, one_rank):
    one, two = _report(one_rank), _report(two_ranks)
    assert one["curves"] == two["curves"]
    assert one["selection"] == two["selection"] and two["selection"]["ga"]["step"] == 2
    assert one["val"] == two["val"]
    # ... while the test numbers did change: the corruption reached what the report gives
    # (vanilla's weights are the same on both; evaluation does not depend on the world size)
    assert one["methods"]["ga"]["forget_vqa_acc"] != two["methods"]["ga"]["forget_vqa_acc"]
    assert one["vanilla"]["retain_vqa_acc"] != two["vanilla"]["retain_vqa_acc"]


def test_preempted_run_resumes_to_the_same_selection(
    tmp_path, two_ranks, small_bench, random_vanilla, refs
):
    cut = _args(tmp_path, small_bench, random_vanilla, "cut", "checkpoint.stop_at=3", refs)
    proc = run_deepspeed(2, cut, cwd=REPO)
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr[-3000:]
    assert "reference scores from" in proc.stdout + proc.stderr  # the full run's, same key
    _ok(run_deepspeed(2, [*cut, "resume=auto"], cwd=REPO))
    run, ref = _report(tmp_path / "cut"), _report(two_ranks)
    assert run["resumed"] == {"ga": {"from_step": 3}}
    assert run["curves"] == ref["curves"] and run["selection"] == ref["selection"]
    assert run["methods"] == ref["methods"]  # the test split at the selected step
    assert _max_diff(_final_weights(tmp_path / "cut"), _final_weights(two_ranks)) == 0.0


def _corrupt_test_answers(bench: Path, out: Path) -> Path:
    """A copy of `bench` whose test split (every evaluation item outside Val_Set/) has wrong
    answers; the training pairs (`metadata`) and the validation split are untouched."""
    from dsunlearn.data.mllmu import SCHEMA

    shutil.copytree(bench, out)
    for folder in ("forget_10", "retain_90", "Test_Set"):
        for f in (out / folder).glob("*.parquet"):
            rows = pq.read_table(f).to_pylist()
            for row in rows:
                for kind in ("Image_Textual_Questions", "Pure_Text_Questions"):
                    for q in row["Classification_Task"][kind]:
                        q["Correct_Answer"] = "ABCD"[("ABCD".index(q["Correct_Answer"]) + 1) % 4]
                for task in ("Generation_Task", "Mask_Task"):
                    for t in row[task]:
                        t["Ground_Truth"] = "corrupted"
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), f)
    return out


def test_tensorboard_holds_the_curves(two_ranks):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (two_ranks / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    report = _report(two_ranks)
    for key in ("forget_vqa_acc", "retain_vqa_acc"):
        got = [(e.step, e.value) for e in acc.Scalars(f"ga/val/{key}")]
        want = [(p["step"], p[key]) for p in report["curves"]["ga"]]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    losses = json.loads((two_ranks / "losses.json").read_text())["ga"]
    got = [(e.step, e.value) for e in acc.Scalars("ga/train/forget_loss")]
    assert got == [(r["step"], pytest.approx(r["forget_loss"], abs=1e-5)) for r in losses]
    assert {"ga/train/forget_lr", "ga/train/forget_grad_norm"} <= tags


def test_unlearn_evaluates_and_selects_on_mllmu(tmp_path, small_bench, random_vanilla):
    """`eval.benchmark=mllmu`: the run is scored by MLLMU-Bench's protocol, validation (the
    folder's Val_Set) and test alike, and selects on its keys."""
    args = unlearn_args(
        tmp_path,
        small_bench,
        random_vanilla,
        "methods=[ga]",
        "optim.steps=2",
        "optim.batch_size=4",
        "eval.benchmark=mllmu",
        "eval.every=1",
        "eval.max_items=4",
        "eval.val_max_items=4",
        "eval.gen_max_new_tokens=4",
        "select.criterion=best_score",
        name="mllmu",
    )
    _ok(run_cli(args, tmp_path))
    report = _report(tmp_path / "mllmu")
    assert report["benchmark"]["name"] == "mllmu"
    assert report["benchmark"]["split_rule"].startswith("Val_Set/")
    assert {"forget_image_mc_acc", "test_image_gen_rouge_l"} <= set(report["methods"]["ga"])
    assert [p["step"] for p in report["curves"]["ga"]] == [1, 2]
    assert "retain_image_mc_acc" in report["curves"]["ga"][0]
    assert report["selection"]["ga"]["targets"]["forget_key"] == "forget_image_mc_acc"
    # MMUBench has no validation split: in-run evaluation on it is refused with one line
    keep = [a for a in args if not a.startswith(("eval.benchmark=", "name="))]
    bad = [*keep, "eval.benchmark=mmubench", f"eval.path={tmp_path}", "name=mmu"]
    proc = run_cli(bad, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MMUBench has no validation split" in proc.stderr.splitlines()[-1]
