"""MMUnlearner's saliency on ZeRO-3 partitions: thresholds, masks, 1 rank = 2 ranks bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsunlearn.config import MaskConfig
from dsunlearn.errors import ConfigError
from dsunlearn.saliency.mask import build_masks, kth_largest
from kernels.mask_apply import unpack_mask
from tests.conftest import DS_CONFIG, REPO, run_cli, run_deepspeed

CPU = torch.device("cpu")
DS_OFFLOAD = str(REPO / "configs" / "deepspeed" / "zero3_cpu_offload.json")


@pytest.mark.parametrize("k", [1, 2, 50, 99, 100])
def test_kth_largest_matches_sorting(k):
    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(37, generator=g) * 10, torch.rand(63, generator=g)]
    parts[1][:5] = 0.0
    want = torch.cat(parts).sort(descending=True).values[k - 1].item()
    assert kth_largest(parts, k, CPU) == want


def test_topk_counts_exactly_k_plus_ties():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 2.0]), "b": torch.tensor([2.0, 0.5, 9.0])}
    ones = {n: torch.ones_like(t) for n, t in scores.items()}
    real = {"a": 4, "b": 3}
    spec = MaskConfig(mode="topk", topk_pct=100 * 3 / 7, eps=0.0)  # k = 3
    # S = (F_f + 0) / (1 + 0) = the scores; top 3 = {9, 3} and the tie at 2 (three of them)
    masks, thr = build_masks(scores, ones, real, lambda n: True, spec, CPU)
    assert thr == 2.0 and sum(int(m.sum()) for m in masks.values()) == 5


def test_paper_defaults():
    spec = MaskConfig()
    assert (spec.mode, spec.tau, spec.modules, spec.linear_only, spec.eps) == (
        "ratio",
        1.0,
        "language",
        True,
        1e-15,
    )


def test_padding_and_filtered_params_are_never_selected():
    f = {"keep": torch.full((6,), 5.0), "skip": torch.full((4,), 5.0)}
    p = {n: torch.ones_like(t) for n, t in f.items()}
    masks, _ = build_masks(f, p, {"keep": 4, "skip": 4}, lambda n: n == "keep", MaskConfig(), CPU)
    assert masks["keep"].tolist() == [True] * 4 + [False] * 2
    assert not masks["skip"].any()


def test_bad_mask_settings():
    f = {"a": torch.ones(3)}
    for spec, match in [
        (MaskConfig(mode="median"), "mode"),
        (MaskConfig(modules="audio"), "modules"),
        (MaskConfig(mode="topk", topk_pct=0.0), "topk_pct"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_masks(f, f, {"a": 3}, lambda n: True, spec, CPU)


def _gathered(folder: Path, world: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Full-order masks from the per-rank files: the test gathers, the recipe never does."""
    summary = json.loads((folder / "summary.json").read_text())
    recs = [torch.load(folder / f"mask_rank{r}.pt") for r in range(world)]
    assert [r["world_size"] for r in recs] == [world] * world
    full = {}
    for name in recs[0]["masks"]:
        parts = [unpack_mask(r["masks"][name], r["partition_numel"][name]) for r in recs]
        full[name] = torch.cat(parts)[: summary["per_param"][name]["numel"]]
    return full, summary


@pytest.fixture(scope="module")
def saliency(tmp_path_factory, small_bench, random_vanilla):
    """`saliency(mode, world)`: the folder of that run over every weight (3 units), run once per
    module: the top-k mask on 2 ranks also drives the masked-update test."""
    done: dict[tuple[str, int], Path] = {}

    def run(mode: str, world: int) -> Path:
        if (mode, world) not in done:
            out = tmp_path_factory.mktemp(f"saliency-{mode}-w{world}")
            args = [
                "saliency",
                f"vanilla={random_vanilla}",
                f"data.path={small_bench}",
                "max_units=3",
                f"mask.mode={mode}",
                "mask.modules=both",  # every weight takes part, so the top-k count is checkable
                "mask.linear_only=false",
                f"out_dir={out}",
                f"deepspeed={DS_CONFIG}",
            ]
            # 1 rank: a plain process (world size 1 without the launcher's two interpreters)
            if world == 1:
                proc = run_cli(args, cwd=REPO)
            else:
                proc = run_deepspeed(world, args, cwd=REPO, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[mode, world] = out
        return done[mode, world]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ratio", "topk"])
def test_masks_are_bit_identical_on_one_and_two_ranks(saliency, mode):
    masks, summaries = {}, {}
    for world in (1, 2):
        masks[world], summaries[world] = _gathered(saliency(mode, world), world)
    one, two = masks[1], masks[2]
    assert one.keys() == two.keys()
    differing = sum(int((one[n] != two[n]).sum()) for n in one)
    selected = sum(int(m.sum()) for m in one.values())
    total = sum(m.numel() for m in one.values())
    print(f"{mode}: {selected}/{total} selected, {differing} bits differ between 1 and 2 ranks")
    assert differing == 0
    assert 0 < selected < total  # the mask picks something, and not everything
    assert summaries[1]["threshold"] == summaries[2]["threshold"]
    if mode == "topk":
        assert selected == round(total * 0.5)  # continuous scores: no ties at the threshold
    # Each rank held 2 fp32 score buffers of its partition only.
    assert summaries[2]["score_bytes_rank0"] * 2 == pytest.approx(
        summaries[1]["score_bytes_rank0"], rel=1e-3
    )
    assert set(summaries[1]["per_group"]) == {"vision", "projector", "language"}


def _masked_update(out: Path, vanilla: Path, bench: Path, masks: Path, *extra: str) -> dict:
    """tests/ranks/masked_update.py on 2 ranks: 3 masked gradient-ascent steps; its report."""
    import subprocess
    import sys

    from dsunlearn.engine.dist import free_port
    from dsunlearn.recipes.demo import launch_env

    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["tests/ranks/masked_update.py", str(vanilla), str(bench), str(masks)]
    cmd += [str(out), "3", *extra]
    env = launch_env(2) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_masked_forget_steps_leave_every_unselected_weight_bit_identical(
    tmp_path, saliency, small_bench, random_vanilla
):
    """2 ranks, AdamW with weight decay 0.1, 3 gradient-ascent steps through the masked update
    (the top-k mask over every weight, from the 2-rank saliency run)."""
    vanilla, masks = random_vanilla, saliency("topk", 2)

    def run(*extra: str) -> dict:
        out = tmp_path / f"update{'_'.join(extra)}.json"
        return _masked_update(out, vanilla, small_bench, masks, *extra)

    masked = run()
    print(masked)
    assert masked["frozen"] > 0 and masked["frozen_changed"] == 0
    assert masked["selected_moved"] > 0.9 * masked["selected"]
    # Clipping sits after the mask: DeepSpeed's clipping norm is the masked gradient's norm.
    assert masked["clip_norm_rel_gap"] < 1e-5
    control = run("adamw")  # torch's AdamW decays every weight: the frozen ones move
    assert control["frozen_changed"] > 0.5 * control["frozen"]


@pytest.mark.slow
def test_masked_forget_steps_under_optimizer_offload_leave_unselected_weights_bit_identical(
    tmp_path, saliency, small_bench, random_vanilla
):
    """The same 3 masked steps with the optimizer offloaded (DeepSpeedCPUAdam on host fp32
    buffers, which DeepSpeed fills during the backward): the mask and the decay reach what it
    steps on, and the clipping norm is still the masked gradient's."""
    out = tmp_path / "offload.json"
    masks = saliency("topk", 2)
    masked = _masked_update(out, random_vanilla, small_bench, masks, f"ds={DS_OFFLOAD}")
    print(masked)
    assert masked["optimizer"] == "DeepSpeedCPUAdam" and masked["offload"]
    assert masked["frozen"] > 0 and masked["frozen_changed"] == 0
    assert masked["selected_moved"] > 0.9 * masked["selected"]
    assert masked["clip_norm_rel_gap"] < 1e-5


@pytest.mark.slow
def test_paper_default_mask_is_language_linear_weights_with_a_heatmap(
    tmp_path, small_bench, random_vanilla
):
    out = tmp_path / "sal"
    args = ["saliency", f"vanilla={random_vanilla}", f"data.path={small_bench}", "max_units=2"]
    proc = run_cli([*args, f"out_dir={out}", f"deepspeed={DS_CONFIG}"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    picked = {n: v["selected"] for n, v in summary["per_param"].items()}
    outside = [n for n, c in picked.items() if c and not n.startswith("model.language_model.")]
    assert outside == []  # nothing of the vision tower, projector or lm_head
    assert all(c == 0 for n, c in picked.items() if not n.endswith("proj.weight"))  # Linear only
    assert sum(picked.values()) > 0
    assert summary["per_group"]["vision"] == 0.0 and summary["per_group"]["language"] > 0.0
    assert (out / "saliency.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "family", ["tiny-llava", "tiny-qwen2-vl", "tiny-llava-next", "tiny-idefics3"]
)
def test_heatmap_cells_come_from_the_family_table(family):
    """Every block Linear weight gets a (group, layer, module) cell, in the vision tower too
    (Qwen2-VL numbers `visual.blocks.N`, not `layers.N`); projector and head get none."""
    from dsunlearn.models import load_model_and_processor
    from dsunlearn.models.loader import block_linears
    from dsunlearn.recipes.saliency import _cell

    model, _ = load_model_and_processor(family, seed=0)
    arch = type(model).__name__
    names = {n for n, _ in model.named_parameters()}
    linears = [f"{m}.weight" for m in block_linears(model) if f"{m}.weight" in names]
    cells = {n: _cell(arch, n) for n in linears}
    layered = {n: c for n, c in cells.items() if c is not None}
    assert {c[0] for c in layered.values()} == {"vision", "language"}
    assert all(c[1] >= 0 and c[2] and not c[2].endswith("weight") for c in layered.values())
    assert _cell(arch, "lm_head.weight") is None
