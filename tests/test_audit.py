"""`dsunlearn audit`: each attack on a hand-made case with a known answer, the verdict rules,
the sets, bad inputs (one line, exit 2), and 1-rank vs 2-rank audits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsunlearn.audit.probe import fit_probe, probe_accuracy
from dsunlearn.audit.quantize import fake_quantize, rtn_symmetric
from dsunlearn.audit.rephrase import TRANSFORMS, flip, redrawn_views
from dsunlearn.audit.sets import build_audit_sets
from dsunlearn.audit.verdict import (
    judge_mia,
    judge_probe,
    judge_quant,
    judge_relearn,
    judge_rephrase,
)
from dsunlearn.config import AuditConfig, EvalConfig
from dsunlearn.errors import ConfigError
from dsunlearn.recipes.audit import check_settings
from tests.conftest import REPO, main_error, run_cli, run_deepspeed, save_random_tiny

VANILLA0 = REPO / "checkpoints" / "vanilla" / "tiny-llava-seed0-e20-a1f76de313"
GOLD0 = REPO / "checkpoints" / "gold" / "tiny-llava-seed0-e20-2478d69510"
INT8_BOUND = 0.05  # gold's forget and retain VQA move at most this much under int8


# ----------------------------------------------------------------------------- quantization


def test_rtn_on_a_hand_made_row():
    # int4: qmax 7; max|w| = 7 -> scale 1; round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    w = torch.tensor([[-7.0, 0.5, 1.5, 2.5, 3.4, -20.0]])
    q = rtn_symmetric(w, 4, 5)  # groups [-7 .. 3.4] and [-20] (padded with zeros)
    assert q.tolist() == [[-7.0, 0.0, 2.0, 2.0, 3.0, -20.0]]
    assert torch.equal(rtn_symmetric(torch.zeros(2, 8), 8, 4), torch.zeros(2, 8))


def test_rtn_equals_torchao_bit_for_bit():
    """Our plain-torch rounding is torchao's affine primitives' to the bit: against outputs
    torchao 0.18.0 wrote (tests/data/make_torchao_reference.py), and live where it is installed."""
    ref = torch.load(REPO / "tests" / "data" / "torchao_rtn_reference.pt")
    assert len(ref["cases"]) == 4  # int8 and int4, fp32 and bf16
    for case in ref["cases"]:
        ours = rtn_symmetric(case["w"], case["bits"], 128)
        assert ours.dtype == case["w"].dtype
        assert torch.equal(ours, case["q"]), (case["bits"], case["w"].dtype)
    try:
        import torchao  # noqa: F401
    except ImportError:
        assert fake_quantize(ref["cases"][0]["w"], 8, 128)[1] == "rtn"
        return
    for case in ref["cases"]:
        q, backend = fake_quantize(case["w"], case["bits"], 128)
        assert backend == "torchao" and torch.equal(q, case["q"])
    assert fake_quantize(ref["cases"][0]["w"][:, :200], 8, 128)[1] == "rtn"  # ragged row


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_error_is_at_most_half_a_step(bits):
    w = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    q = rtn_symmetric(w, bits, 128)
    groups = torch.nn.functional.pad(w, (0, 84)).reshape(16, 3, 128)
    step = (groups.abs().amax(-1) / (2 ** (bits - 1) - 1)).repeat_interleave(128, dim=1)[:, :300]
    assert bool(((q - w).abs() <= step / 2 + 1e-6).all())
    assert len(torch.unique(q[0, :128])) <= 2**bits - 1


# ----------------------------------------------------------------------------- rephrasing


def test_transforms_keep_size_and_flip_is_an_involution():
    img = Image.new("RGB", (32, 32), (10, 20, 30))
    img.putpixel((3, 5), (250, 0, 0))
    for name, fn in TRANSFORMS.items():
        out = fn(img)
        assert out.size == img.size and out.mode == "RGB", name
    assert list(flip(flip(img)).getdata()) == list(img.getdata())
    assert list(flip(img).getdata()) != list(img.getdata())


def test_redrawn_views_are_new_pictures_of_the_same_look():
    from dsunlearn.data import faces

    look = faces.choose_identities(1, np.random.default_rng(0))[0].as_dict()
    first = redrawn_views(look, 3, 32, seed=1, avoid=[])
    again = redrawn_views(look, 3, 32, seed=1, avoid=[])
    assert [faces.png_bytes(a) for a in first] == [faces.png_bytes(b) for b in again]
    avoided = redrawn_views(look, 2, 32, seed=1, avoid=first[:1])
    assert faces.png_bytes(first[0]) not in {faces.png_bytes(v) for v in avoided}
    assert len({faces.png_bytes(v) for v in first}) == 3


# ----------------------------------------------------------------------------- identity probe


def test_probe_separates_separable_people_and_not_identical_ones():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 5
    y = torch.arange(3).repeat_interleave(10)
    x = centres[y] + 0.1 * torch.randn(30, 8, generator=g)
    probe = fit_probe(x, y, 3, l2=1e-2)
    x_test = centres[torch.tensor([0, 1, 2, 2])] + 0.1 * torch.randn(4, 8, generator=g)
    assert probe_accuracy(probe, x_test, torch.tensor([0, 1, 2, 2])) == 1.0
    # every person looks the same: one class wins for every row; the accuracy is its share
    same = torch.zeros(30, 8)
    flat = fit_probe(same, y, 3, l2=1e-2)
    pred_share = probe_accuracy(flat, torch.zeros(3, 8), torch.tensor([0, 1, 2]))
    assert pred_share == pytest.approx(1 / 3)
    assert math.isnan(probe_accuracy(probe, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))


# ----------------------------------------------------------------------------- verdicts


def _curve(values):
    return {"steps": [0, 5, 20], "forget_facts": values, "forget_heldout_facts": values}


def test_relearning_verdicts():
    gold = _curve([0.1, 0.15, 0.2])
    assert (
        judge_relearn({"model": _curve([0.1, 0.15, 0.25]), "gold": gold}, 0.1)["status"]
        == "removed"
    )
    hidden = judge_relearn({"model": _curve([0.1, 0.5, 0.9]), "gold": gold}, 0.1)
    assert hidden["status"] == "hidden" and hidden["gap_at_step"] == pytest.approx(0.7)
    assert hidden["recovery_vs_gold"] == pytest.approx(0.8 - 0.1)
    vanilla = judge_relearn({"model": _curve([1.0, 1.0, 1.0]), "gold": gold}, 0.1)
    assert vanilla["status"] == "not forgotten"


def test_quantization_probe_and_mia_verdicts():
    def q(none, int4):
        return {"none": {"forget_vqa": none}, "int4": {"forget_vqa": int4}}

    assert judge_quant({"model": q(0.1, 0.6), "gold": q(0.1, 0.1)}, 0.1)["status"] == "hidden"
    assert judge_quant({"model": q(0.1, 0.15), "gold": q(0.1, 0.1)}, 0.1)["status"] == "removed"

    def p(acc):
        return {
            layer: {"forget_heldout": acc, "retain_heldout": 1.0} for layer in ("middle", "last")
        }

    assert judge_probe({"model": p(1.0), "gold": p(0.5)}, 0.1)["status"] == "readable"
    assert judge_probe({"model": p(0.55), "gold": p(0.5)}, 0.1)["status"] == "like gold"

    def m(a):
        return {"loss": {"auc": a, "tpr_at_fpr": 0.0}, "fpr": 0.01, "members": 2}

    assert judge_mia({"model": m(0.8), "gold": m(0.5)}, 0.1)["status"] == "readable"
    assert judge_mia({"model": m(0.55), "gold": m(0.5)}, 0.1)["status"] == "like gold"


def test_rephrase_verdicts_and_gaps():
    gold = {"original": 0.1, "flip": 0.1, "redraw": 0.2}
    hidden = judge_rephrase(
        {"model": {"original": 0.1, "flip": 0.15, "redraw": 0.5}, "gold": gold}, 0.1
    )
    assert hidden["status"] == "hidden"
    assert hidden["flip_gap"] == pytest.approx(0.05) and hidden["redraw_gap"] == pytest.approx(0.3)
    removed = judge_rephrase({"model": {**gold, "redraw": float("nan")}, "gold": gold}, 0.1)
    assert removed["status"] == "removed" and "redraw_gap" not in removed  # no view: no gap


def test_a_runs_audit_summary_keeps_the_verdicts_and_the_int4_figure():
    """What `unlearn audit=true` keeps in report.json and shows in report.md (the end-to-end
    audits below quantize to int8 only: int4 is the same code, checked at the rounding above)."""
    from dsunlearn.audit.verdict import audit_summary
    from dsunlearn.report import audit_table

    def q(none, int8, int4=None):
        out = {"none": {"forget_vqa": none}, "int8": {"forget_vqa": int8}}
        return out if int4 is None else {**out, "int4": {"forget_vqa": int4}}

    relearn = judge_relearn(
        {"model": _curve([0.1, 0.5, 0.9]), "gold": _curve([0.1, 0.15, 0.2])}, 0.1
    )
    quant = judge_quant({"model": q(0.1, 0.1, 0.6), "gold": q(0.1, 0.1, 0.1)}, 0.1)
    attacks = {"relearn": {"verdict": relearn}, "quant": {"verdict": quant}}
    summary = audit_summary({"attacks": attacks})
    assert summary == {
        "verdicts": {"relearn": "hidden", "quant": "hidden"},
        "relearn_recovery_vs_gold": pytest.approx(0.7),
        "int4_forget_vs_gold": pytest.approx(0.5),
    }
    table = audit_table({"audit": {"ga": summary}})
    assert "| ga | hidden | hidden | 0.700 | 0.500 |" in table
    int8_only = judge_quant({"model": q(0.1, 0.1), "gold": q(0.1, 0.1)}, 0.1)
    summary = audit_summary({"attacks": {"quant": {"verdict": int8_only}}})
    assert summary == {"verdicts": {"quant": "removed"}}


# ----------------------------------------------------------------------------- sets and settings


def test_audit_sets_keep_the_identity_question_out_of_the_facts(small_bench):
    from dsunlearn.data.mllmu import load_benchmark

    view = load_benchmark(str(small_bench)).split("test")
    sets = build_audit_sets(view, EvalConfig(), retain_max_items=0, seed=0)
    forget = view.forget
    n_img = sum(len(r.images) for r in forget)
    assert len(sets.forget_vqa) == sum(len(r.images) * len(r.mc_image) for r in forget)
    assert len(sets.forget_facts) == sum(len(r.images) * (len(r.mc_image) - 1) for r in forget)
    assert all(
        ex.options[ex.answer_index] not in {r.name for r in forget} for ex in sets.forget_facts
    )
    assert [(ex.entity_id, ex.answer) for ex in sets.relearn] == [(r.id, r.name) for r in forget]
    assert len(sets.identity_train) == n_img + sum(len(r.images) for r in view.retain)
    heldout_ids = {r.id for r in view.test_forget}
    assert sets.identity_test and {ex.entity_id for ex in sets.identity_test} <= heldout_ids
    assert sets.mia.members and sets.mia.nonmembers


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attacks": ["relearn", "jailbreak"]}, "unknown attack 'jailbreak'"),
        ({"rephrase": ["sepia"]}, "unknown image rephrasing 'sepia'"),
        ({"relearn_steps": [0, 5]}, "relearn_steps"),
        ({"quant_bits": [16]}, "quant_bits"),
    ],
)
def test_bad_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(AuditConfig(**overrides), "builtin")
    with pytest.raises(ConfigError, match="relearn_batch_size 3"):
        check_settings(AuditConfig(relearn_batch_size=3), "builtin", world_size=2)
    with pytest.raises(ConfigError, match="MLLMU-Bench-shaped"):
        check_settings(AuditConfig(), "clear")


# ----------------------------------------------------------------------------- the command

SMALL = [  # every attack, at the least work that still exercises it (int4: unit-tested above)
    "audit.relearn_steps=[1]",
    "audit.quant_bits=[8]",
    "audit.retain_max_items=12",
    "audit.rephrase=[redraw]",
    "audit.redraw_views=1",
    "eval.max_items=12",
]


@pytest.fixture(scope="module")
def bench0(tmp_path_factory) -> Path:
    """The seed-0 built-in benchmark that the shipped vanilla and gold models learned."""
    from dsunlearn.data.builtin import build_benchmark

    return build_benchmark(tmp_path_factory.mktemp("bench0") / "b20", seed=0, entities=20)


def _audit_args(out: Path, bench: Path, model: Path, *extra: str) -> list[str]:
    return [
        "audit",
        "--model",
        str(model),
        "--vanilla",
        str(VANILLA0),
        "--gold",
        str(GOLD0),
        "--data",
        str(bench),
        "--out",
        str(out),
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def vanilla_audit(tmp_path_factory, bench0) -> dict:
    """The vanilla model audited as if it were unlearned, on 1 rank."""
    out = tmp_path_factory.mktemp("audit1")
    proc = run_cli(_audit_args(out, bench0, VANILLA0), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "audit.md").is_file() and (out / "audit.png").stat().st_size > 0
    return json.loads((out / "audit.json").read_text())


@pytest.mark.slow
def test_a_model_equal_to_vanilla_is_caught_by_every_attack_on_the_model(vanilla_audit):
    a = vanilla_audit["attacks"]
    # relearning: it starts where vanilla ends (nothing to relearn), far above gold
    assert a["relearn"]["model"] == a["relearn"]["vanilla"]
    assert a["relearn"]["model"]["forget_facts"][0] >= 0.9
    assert a["relearn"]["gold"]["forget_facts"][0] <= 0.35
    for name in ("relearn", "quant", "rephrase"):
        assert a[name]["verdict"]["status"] == "not forgotten", (name, a[name]["verdict"])
    # membership: the model's scores are vanilla's, item for item
    assert a["mia"]["model"] == a["mia"]["vanilla"]


@pytest.mark.slow
def test_gold_is_unchanged_by_int8_within_the_bound(vanilla_audit):
    gold = vanilla_audit["attacks"]["quant"]["gold"]
    for metric in ("forget_vqa", "retain_vqa"):
        assert abs(gold["int8"][metric] - gold["none"][metric]) <= INT8_BOUND, gold


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_exit_2(tmp_path, bench0, capsys):
    """Refused before any rank starts: in this process, but for one case in a fresh one (the
    real exit path)."""
    other = save_random_tiny("tiny-qwen2-vl", tmp_path / "qwen")
    cases = [
        (["--gold", str(tmp_path / "nowhere")], "gold model", True),
        (["--gold", str(other)], "architecture differs", False),
        (["audit.attacks=[relearn,jailbreak]"], "unknown attack", False),
    ]
    for extra, message, fresh in cases:
        args = _audit_args(tmp_path / "out", bench0, VANILLA0)
        if extra[0] == "--gold":
            args[args.index("--gold") + 1] = extra[1]
        else:
            args += extra
        if fresh:
            proc = run_cli(args, cwd=REPO)
            lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsunlearn:")]
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
            line = lines[0]
        else:
            line = main_error(capsys, args)
        assert message in line, line
        assert not (tmp_path / "out" / "audit.json").exists()


def test_reference_cache_runs_gold_once_and_the_audited_model_always(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from dsunlearn.audit import auditor
    from dsunlearn.config import DataConfig

    calls: list[str] = []
    monkeypatch.setitem(
        auditor.RUNS, "quant", lambda ctx, path: calls.append(path) or {"n": len(calls)}
    )
    gold = tmp_path / "gold"
    gold.mkdir()
    (gold / "model.safetensors").write_bytes(b"1234")
    cfg = AuditConfig(reference_cache=str(tmp_path / "cache"))
    ctx = SimpleNamespace(info=SimpleNamespace(device=torch.device("cpu"), is_main=True))

    def cache(**kw):
        return auditor.ReferenceCache(
            cfg, DataConfig(path=str(tmp_path)), "builtin", EvalConfig(**kw), "fp32", 0, 1
        )

    first = cache().run("quant", "gold", str(gold), ctx)
    assert cache().run("quant", "gold", str(gold), ctx) == first == {"n": 1}
    cache().run("quant", "model", str(gold), ctx)
    cache().run("quant", "model", str(gold), ctx)
    assert len(calls) == 3  # gold once, the audited model every time
    cache(max_items=5).run("quant", "gold", str(gold), ctx)  # other settings: another entry
    (gold / "model.safetensors").write_bytes(b"123456")  # new weights: another entry
    cache().run("quant", "gold", str(gold), ctx)
    assert len(calls) == 5


# The frozen path (quant, mia; probe and rephrase load the same way) and the trainable one
# (relearn): what the kept partitions must survive.
ATTACKS_ON_WEIGHTS = "audit.attacks=[relearn,quant,mia]"


@pytest.mark.slow
def test_unlearn_audit_true_audits_the_selected_weights_where_they_are(
    tmp_path, bench0, vanilla_audit
):
    """`unlearn audit=true` on 2 ranks audits GA's weights from the ranks' own partitions: the
    same figures as `dsunlearn audit` on the exported model folder of the same weights; its
    gold and vanilla figures are the 1-rank audit's (the folder audit reads them from the
    reference cache the in-run audit wrote)."""
    from tests.conftest import unlearn_args

    args = unlearn_args(
        tmp_path,
        bench0,
        VANILLA0,
        "methods=[ga]",
        "optim.steps=3",
        f"gold={GOLD0}",
        "eval.enabled=false",
        "checkpoint.final=true",
        "audit=true",
        *SMALL,
        ATTACKS_ON_WEIGHTS,
        f"audit.reference_cache={tmp_path / 'refs'}",
        name="run",
    )
    proc = run_deepspeed(2, args, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    summary = report["audit"]["ga"]
    assert set(summary["verdicts"]) == {"relearn", "quant", "mia"}
    assert "## Audit" in (tmp_path / "run" / "report.md").read_text()
    in_run = json.loads((tmp_path / "run" / "audit" / "ga" / "audit.json").read_text())

    folder = tmp_path / "ga-model"
    ckpt = tmp_path / "run" / "checkpoints" / "ga"
    exp = run_cli(["export", "--ckpt", str(ckpt), "--out", str(folder)], cwd=REPO)
    assert exp.returncode == 0, exp.stderr[-2000:]
    cached = f"audit.reference_cache={tmp_path / 'refs'}"
    args = _audit_args(tmp_path / "audit", bench0, folder, cached, ATTACKS_ON_WEIGHTS)
    proc = run_deepspeed(2, args, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from_folder = json.loads((tmp_path / "audit" / "audit.json").read_text())
    for name in ("relearn", "quant", "mia"):
        assert in_run["attacks"][name]["model"] == from_folder["attacks"][name]["model"], name
    # GA moved the weights: the audited model is not the vanilla model
    assert in_run["attacks"]["mia"]["model"] != in_run["attacks"]["mia"]["vanilla"]
    # 2 ranks give the 1-rank figures (relearning and MIA up to float summation order)
    two, one = in_run["attacks"], vanilla_audit["attacks"]
    for role in ("gold", "vanilla"):
        assert two["quant"][role] == one["quant"][role], role
        assert two["relearn"][role]["forget_facts"] == one["relearn"][role]["forget_facts"]
        for stat, v in one["mia"][role].items():
            if isinstance(v, dict):
                assert two["mia"][role][stat]["auc"] == pytest.approx(v["auc"], abs=1e-9)
