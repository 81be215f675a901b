"""1 rank vs 2 ranks under ZeRO-3, through the real deepspeed launcher: same loss curve."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DS_CONFIG, REPO, run_deepspeed, save_random_tiny

STEPS = 6


def _run(ranks: int, tmp_path, bench, vanilla, family: str, methods: str = "[kl_min,npo]") -> dict:
    args = [
        "unlearn",
        "--config",
        "configs/demo.yaml",
        f"name=w{ranks}",
        f"out_dir={tmp_path}",
        f"data.path={bench}",
        f"vanilla={vanilla}",
        f"model.name={family}",
        f"methods={methods}",  # retain steps, the frozen ZeRO-3 reference engine
        f"optim.steps={STEPS}",
        "optim.batch_size=4",
        "optim.lr=1e-3",
        "eval.enabled=false",
        f"deepspeed={DS_CONFIG}",
    ]
    proc = run_deepspeed(ranks, args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / f"w{ranks}" / "report.json").read_text())
    assert report["world_size"] == ranks
    return json.loads((tmp_path / f"w{ranks}" / "losses.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_one_and_two_ranks_give_the_same_loss_curve(tmp_path, small_bench, family):
    vanilla = save_random_tiny(family, tmp_path / "vanilla")
    one = _run(1, tmp_path, small_bench, vanilla, family)
    two = _run(2, tmp_path, small_bench, vanilla, family)
    assert set(one) == set(two) == {"kl_min", "npo"}
    worst = 0.0
    for method in one:
        assert len(one[method]) == len(two[method]) == STEPS
        for a, b in zip(one[method], two[method], strict=True):
            for key in ("forget_loss", "retain_loss"):
                if key in a:
                    worst = max(worst, abs(a[key] - b[key]))
    # Training moved the losses, so equal curves are not just equal starting points.
    assert one["kl_min"][0]["forget_loss"] != one["kl_min"][-1]["forget_loss"]
    print(f"max |loss(1 rank) - loss(2 ranks)| = {worst:.3g}")
    assert worst <= 1e-4


NEW_METHODS = ["simnpo", "idkpo", "undial", "rmu"]


@pytest.mark.slow
def test_the_newer_methods_give_the_same_losses_on_one_and_two_ranks(
    tmp_path, small_bench, random_vanilla
):
    """SimNPO, IdkPO (refusal pairs), UNDIAL (shifted teacher from the reference engine) and
    RMU (hooked layer activations, three MLPs trained, the rest frozen under ZeRO-3)."""
    methods = "[" + ",".join(NEW_METHODS) + "]"
    one = _run(1, tmp_path, small_bench, random_vanilla, "tiny-llava", methods)
    two = _run(2, tmp_path, small_bench, random_vanilla, "tiny-llava", methods)
    assert set(one) == set(two) == set(NEW_METHODS)
    worst = 0.0
    for method in NEW_METHODS:
        assert len(one[method]) == len(two[method]) == STEPS
        first, last = one[method][0]["forget_loss"], one[method][-1]["forget_loss"]
        assert first != last, method  # training moved it
        for a, b in zip(one[method], two[method], strict=True):
            assert a.keys() == b.keys()
            for key in ("forget_loss", "retain_loss"):
                if key in a:
                    worst = max(worst, abs(a[key] - b[key]) / max(1.0, abs(a[key])))
    print(f"max relative |loss(1 rank) - loss(2 ranks)| = {worst:.3g}")
    assert worst <= 1e-4
