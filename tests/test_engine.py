"""1 rank vs 2 ranks under ZeRO-3: same loss curve (the 1-rank run a plain `python -m dsunlearn`
process, a world of size 1; the 2-rank run through the real deepspeed launcher)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DS_CONFIG, REPO, run_cli, run_deepspeed, save_random_tiny

STEPS = 6
# kl_min: retain steps and the frozen ZeRO-3 reference engine; npo: the reference engine too.
METHODS = ["kl_min", "npo"]
# SimNPO, IdkPO (refusal pairs), UNDIAL (shifted teacher from the reference engine) and RMU
# (hooked layer activations, three MLPs trained, the rest frozen under ZeRO-3).
NEW_METHODS = ["simnpo", "idkpo", "undial", "rmu"]


def _run(ranks: int, tmp_path, bench, vanilla, family: str, methods: list[str]) -> dict:
    args = [
        "unlearn",
        "--config",
        "configs/demo.yaml",
        f"name=w{ranks}",
        f"out_dir={tmp_path}",
        f"data.path={bench}",
        f"vanilla={vanilla}",
        f"model.name={family}",
        "methods=[" + ",".join(methods) + "]",
        f"optim.steps={STEPS}",
        "optim.batch_size=4",
        "optim.lr=1e-3",
        "eval.enabled=false",
        f"deepspeed={DS_CONFIG}",
    ]
    if ranks == 1:
        proc = run_cli(args, cwd=REPO, timeout=600)
    else:
        proc = run_deepspeed(ranks, args, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / f"w{ranks}" / "report.json").read_text())
    assert report["world_size"] == ranks
    return json.loads((tmp_path / f"w{ranks}" / "losses.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, methods",
    [("tiny-llava", METHODS + NEW_METHODS), ("tiny-qwen2-vl", METHODS)],
    ids=["tiny-llava", "tiny-qwen2-vl"],
)
def test_one_and_two_ranks_give_the_same_loss_curve(tmp_path, small_bench, family, methods):
    """kl_min and npo on both families; on tiny-llava the newer methods too, in the same two
    launches (each method trains a fresh engine from the vanilla weights, with its own seeded
    data streams: sharing a launch does not change its losses)."""
    vanilla = save_random_tiny(family, tmp_path / "vanilla")
    one = _run(1, tmp_path, small_bench, vanilla, family, methods)
    two = _run(2, tmp_path, small_bench, vanilla, family, methods)
    assert set(one) == set(two) == set(methods)

    worst = 0.0
    for method in METHODS:
        assert len(one[method]) == len(two[method]) == STEPS
        for a, b in zip(one[method], two[method], strict=True):
            for key in ("forget_loss", "retain_loss"):
                if key in a:
                    worst = max(worst, abs(a[key] - b[key]))
    # Training moved the losses, so equal curves are not just equal starting points.
    assert one["kl_min"][0]["forget_loss"] != one["kl_min"][-1]["forget_loss"]
    print(f"max |loss(1 rank) - loss(2 ranks)| = {worst:.3g}")
    assert worst <= 1e-4

    newer = [m for m in NEW_METHODS if m in methods]
    worst = 0.0
    for method in newer:
        assert len(one[method]) == len(two[method]) == STEPS
        first, last = one[method][0]["forget_loss"], one[method][-1]["forget_loss"]
        assert first != last, method  # training moved it
        for a, b in zip(one[method], two[method], strict=True):
            assert a.keys() == b.keys()
            for key in ("forget_loss", "retain_loss"):
                if key in a:
                    worst = max(worst, abs(a[key] - b[key]) / max(1.0, abs(a[key])))
    if newer:
        print(f"newer methods: max relative |loss(1 rank) - loss(2 ranks)| = {worst:.3g}")
    assert worst <= 1e-4
