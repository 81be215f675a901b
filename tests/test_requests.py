"""Sequential forget requests (`requests=[[...], ...]`, recipes/requests.py): the plan and the
views each request trains and is scored on, the refusals, the report's per-request tables and
plot; then on 2 real ZeRO-3 ranks a run of 2 requests, preempted in request 2 and resumed, must
end on the uninterrupted run's weights and per-request metrics, with MMUnlearner's mask
overlap equal to the one counted offline from the mask files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsunlearn.config import UnlearnConfig, load_config
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.engine.preempt import PREEMPTED_EXIT
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.recipes.requests import (
    check_request_settings,
    eval_view,
    gold_view,
    mask_overlap,
    plan_requests,
    train_view,
)
from dsunlearn.report import write_report
from dsunlearn.report_requests import row_colors
from tests.conftest import REPO, run_cli, run_deepspeed, unlearn_args


def _cfg(*overrides: str) -> UnlearnConfig:
    return load_config(UnlearnConfig, None, list(overrides))


def _ids(records) -> set[str]:
    return {r.id for r in records}


def test_plan_and_views(small_bench: Path) -> None:
    bench = load_benchmark(str(small_bench))
    assert _ids(bench.forget) == {"P006"}  # the data's forget split; P001-P005 retain
    (only,) = plan_requests(_cfg(), bench)  # no requests: one, the forget split
    assert not only.sequential and train_view(bench, only) is bench
    assert gold_view(bench, only) == (None, True)

    r1, r2 = plan_requests(_cfg("requests=[[P006], [P002, P004]]"), bench)
    assert (r1.people, r1.forgotten, r2.forgotten) == (
        ("P006",),
        ("P006",),
        ("P006", "P002", "P004"),
    )
    assert (r2.key("ga"), r2.label("ga"), r1.is_last, r2.is_last) == ("r2/ga", "ga@r2", False, True)
    # Training: this request's people; retain: everyone not forgotten so far.
    t1, t2 = train_view(bench, r1), train_view(bench, r2)
    assert _ids(t1.forget) == {"P006"} and _ids(t1.retain) == {f"P00{i}" for i in range(1, 6)}
    assert _ids(t2.forget) == {"P002", "P004"} and _ids(t2.retain) == {"P001", "P003", "P005"}
    # Scoring: everyone forgotten so far; retain: those no request names (the same for all).
    e1, e2 = eval_view(bench, r1), eval_view(bench, r2)
    assert _ids(e1.forget) == {"P006"} and _ids(e2.forget) == {"P006", "P002", "P004"}
    assert _ids(e1.retain) == _ids(e2.retain) == {"P001", "P003", "P005"}
    assert _ids(e2.test) == {"P001", "P002", "P003", "P004", "P005", "P006"}
    # Gold never saw P006 only: exact for r1, scored on its own unseen person for r2.
    assert gold_view(bench, r1) == (None, True)
    g2, exact = gold_view(bench, r2)
    assert not exact and _ids(g2.forget) == {"P006"} and _ids(g2.retain) == _ids(e2.retain)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["requests=[[P006], [P099]]"], DataError, "request 2 names 'P099', who is not in"),
        (["requests=[[P006], [P002, P006]]"], ConfigError, "'P006' is named twice (request 2)"),
        (["requests=[[P001, P002], [P003, P004, P005]]"], ConfigError, "every retain person"),
        (["requests=[[P006], []]"], ConfigError, "request 2 names nobody"),
        (["requests=[[P006]]", "eval.path=/x"], ConfigError, "leave eval.path unset"),
        (["requests=[[P006]]", "audit=true"], ConfigError, "dsunlearn audit"),
    ],
)
def test_refusals(small_bench: Path, overrides, error, message) -> None:
    bench = load_benchmark(str(small_bench))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg = _cfg(*overrides)
        check_request_settings(cfg)
        plan_requests(cfg, bench)


def test_unknown_person_is_one_line_before_training(tmp_path, small_bench, random_vanilla):
    args = unlearn_args(tmp_path, small_bench, random_vanilla, "requests=[[P006],[P404]]")
    proc = run_cli([*args, "methods=[ga]", "report_to=[]", "name=bad"], tmp_path)
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("dsunlearn: error: requests: request 2 names 'P404'"), proc.stderr
    assert not (tmp_path / "bad" / "report.json").exists()


def test_mask_overlap_counts() -> None:
    a = {"w": torch.tensor([1, 1, 0, 0], dtype=torch.bool), "v": torch.tensor([True])}
    b = {"w": torch.tensor([1, 0, 1, 0], dtype=torch.bool), "v": torch.tensor([True])}
    out = mask_overlap(a, b, torch.device("cpu"))
    assert out == {"jaccard": 2 / 4, "kept_share": 2 / 3, "selected_before": 3}
    none = {"w": torch.zeros(4, dtype=torch.bool)}
    assert mask_overlap(none, none, torch.device("cpu"))["jaccard"] == 0.0


def _entry(i: int, people: list[str], forgotten: list[str], ga: float, gold: float) -> dict:
    row = {"forget_vqa_acc": ga, "retain_vqa_acc": 0.9}
    return {
        "index": i,
        "people": people,
        "forgotten": forgotten,
        "vanilla": {"forget_vqa_acc": 1.0, "retain_vqa_acc": 1.0},
        "methods": {"ga": row},
        "gold": {"forget_vqa_acc": gold, "retain_vqa_acc": 1.0},
        "gold_row": "exact" if i == 1 else "approximate",
        "vs_gold": {"ga": {"gap": {"forget_vqa_acc": ga - gold}}},
        "mask_overlap": {"mmunlearner": {"jaccard": 0.25, "kept_share": 0.5}} if i == 2 else {},
    }


def test_report_tables_and_plot(tmp_path: Path) -> None:
    reqs = [_entry(1, ["P1"], ["P1"], 0.4, 0.1), _entry(2, ["P2"], ["P1", "P2"], 0.3, 0.2)]
    report = {"vanilla": {}, "methods": {"ga": reqs[-1]["methods"]["ga"]}, "chance": 0.25}
    report.update({"world_size": 2, "elapsed_s": 1.0, "requests": reqs})
    write_report(tmp_path, report)
    md = (tmp_path / "report.md").read_text()
    assert "| 2 | P2 | 2 | approximate | Jaccard 0.250, keeps 0.500 |" in md
    assert "| ga | 0.400 | 0.300 |" in md and "| gold | 0.100 | 0.200 |" in md
    assert "| ga | 0.300 | 0.100 |" in md  # gap to gold, per request
    assert (tmp_path / "requests.png").stat().st_size > 0
    colors = row_colors([f"m{i}" for i in range(11)])  # the demo's 11 methods: 11 colours
    assert len(set(colors.values())) == 11


# --- 2 ranks: preempted in request 2, resumed ------------------------------------------------

STEPS = 4
REQUESTS = "requests=[[P006],[P002]]"


def _args(out: Path, bench: Path, vanilla: Path, name: str, *extra: str) -> list[str]:
    return unlearn_args(
        out,
        bench,
        vanilla,
        REQUESTS,
        "methods=[mmunlearner]",
        f"optim.steps={STEPS}",
        "optim.batch_size=4",
        "method.mmu_max_units=2",
        "method.mmu_mask.mode=topk",  # a random model's ratio mask can be empty
        "method.mmu_retain_per_forget=1",
        "eval.every=0",
        "eval.max_items=2",  # each rank scores one item per set: the rows, cheaply
        "eval.gen_max_new_tokens=2",
        f"gold={vanilla}",  # a stand-in: gives the rows, exact then approximate
        "checkpoint.final=true",
        "report_to=[]",
        *extra,
        name=name,
    )


def _final(run: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / tag / "mmunlearner"))


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_preempted_in_request_2_resumes_to_the_uninterrupted_result(
    tmp_path, small_bench, random_vanilla
):
    from dsunlearn.saliency.store import load_mask

    _ok(run_deepspeed(2, _args(tmp_path, small_bench, random_vanilla, "full"), cwd=REPO))
    cut = _args(tmp_path, small_bench, random_vanilla, "cut", "checkpoint.stop_at=2")
    proc = run_deepspeed(2, [*cut, "checkpoint.stop_request=2"], cwd=REPO)
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr[-3000:]
    assert "mmunlearner@r2 stopped after step 2" in proc.stderr
    _ok(run_deepspeed(2, [*cut, "checkpoint.stop_request=2", "resume=auto"], cwd=REPO))

    full, run = tmp_path / "full", tmp_path / "cut"
    reports = [json.loads((r / "report.json").read_text()) for r in (full, run)]
    assert reports[1]["resumed"] == {"mmunlearner": {"from_step": 2}}
    # Every metric, verdict and the mask overlap; method_info says where the mask came from
    # (the resumed request's: its checkpoint), so it is compared apart.
    info = [[r.pop("method_info") for r in rep["requests"]] for rep in reports]
    assert reports[0]["requests"] == reports[1]["requests"]
    assert info[1][1]["mmunlearner"]["source"].endswith("checkpoints/r2/mmunlearner/step2")
    assert info[0][1]["mmunlearner"]["threshold"] == info[1][1]["mmunlearner"]["threshold"]
    assert [r["gold_row"] for r in reports[0]["requests"]] == ["exact", "approximate"]
    assert [r["forgotten"] for r in reports[0]["requests"]] == [["P006"], ["P006", "P002"]]
    losses = [json.loads((r / "losses.json").read_text()) for r in (full, run)]
    assert set(losses[0]) == {"r1/mmunlearner", "r2/mmunlearner"} and losses[0] == losses[1]
    for tag in ("r1", "r2"):
        a, b = _final(full, tag), _final(run, tag)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # Request 2 started from request 1's selected weights: they differ from the vanilla ones.
    r1 = _final(full, "r1")
    from dsunlearn.models.loader import load_model_and_processor

    vanilla = dict(load_model_and_processor(str(random_vanilla))[0].named_parameters())
    moved = [k for k in r1 if k in vanilla and not torch.equal(r1[k], vanilla[k].detach())]
    assert moved, "request 1 changed nothing"
    # The handed-on weights are gone once request 2 finished; the mask stays for the overlap.
    handoff = full / "requests" / "r1" / "mmunlearner"
    assert not list(handoff.glob("weights_rank*.pt"))
    inter = union = before = 0
    latest = full / "checkpoints" / "r2" / "mmunlearner"
    latest = latest / (latest / "latest").read_text().strip()
    for rank in (0, 1):
        old, _ = load_mask(handoff, rank, 2)
        new, _ = load_mask(latest, rank, 2)
        for name, m in new.items():
            inter += int((m & old[name]).sum())
            union += int((m | old[name]).sum())
            before += int(old[name].sum())
    overlap = reports[0]["requests"][1]["mask_overlap"]["mmunlearner"]
    assert overlap["jaccard"] == pytest.approx(inter / union) and before > 0
    assert overlap["kept_share"] == pytest.approx(inter / before)
