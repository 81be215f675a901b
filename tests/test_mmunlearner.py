"""MMUnlearner: the schedule, the mask's life (computed, saved with the checkpoint, reloaded),
and what may move an unselected weight in the alternating schedule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsunlearn.config import LoraConfig, MaskConfig, MethodConfig, OptimConfig
from dsunlearn.errors import ConfigError
from dsunlearn.methods import build_method
from dsunlearn.models import load_model_and_processor
from dsunlearn.models.loader import block_linears
from dsunlearn.models.lora import apply_lora
from dsunlearn.saliency.compute import check_filter_admits, mask_filter, own_param_name
from dsunlearn.saliency.store import load_mask, save_mask
from kernels.mask_apply import unpack_mask
from tests.conftest import REPO, main_error, run_cli, run_deepspeed, unlearn_args


def test_paper_schedule_and_decay_moved_out_of_the_optimizer():
    method = build_method("mmunlearner", MethodConfig())
    assert method.uses_retain
    assert method.retain_steps_per_forget(96, 864) == 9  # len(retain) / len(forget)
    assert method.retain_steps_per_forget(10, 4) == 1
    assert (
        build_method("mmunlearner", MethodConfig(mmu_retain_per_forget=3)).retain_steps_per_forget(
            96, 864
        )
        == 3
    )
    optim = method.optim(OptimConfig(lr=2e-4, weight_decay=0.1))
    assert optim.weight_decay == 0.0 and method.weight_decay == 0.1
    assert optim.lr == 2e-4  # mmu_lr 0: the run's lr
    own = build_method("mmunlearner", MethodConfig(mmu_lr=5e-4)).optim(OptimConfig(lr=2e-4))
    assert own.lr == 5e-4


def test_bad_mask_settings_fail_when_the_method_is_built():
    with pytest.raises(ConfigError, match="mode"):
        build_method("mmunlearner", MethodConfig(mmu_mask=MaskConfig(mode="median")))
    with pytest.raises(ConfigError, match="mmu_lr"):
        build_method("mmunlearner", MethodConfig(mmu_lr=-1.0))
    with pytest.raises(ConfigError, match="mmu_retain_per_forget"):
        build_method("mmunlearner", MethodConfig(mmu_retain_per_forget=-1))


def test_mask_file_round_trip_and_world_size_check(tmp_path):
    masks = {"a.weight": torch.tensor([True, False, True]), "b.weight": torch.zeros(13).bool()}
    masks["b.weight"][[0, 7, 12]] = True
    save_mask(tmp_path, masks, MaskConfig(mode="topk"), 0.25, world_size=2, rank=1)
    back, meta = load_mask(tmp_path, rank=1, world_size=2)
    assert {n: m.tolist() for n, m in back.items()} == {n: m.tolist() for n, m in masks.items()}
    assert meta == {"spec": vars(MaskConfig(mode="topk")), "threshold": 0.25, "world_size": 2}
    with pytest.raises(ConfigError, match="cut for world size 2, this run has 4"):
        load_mask(tmp_path, rank=1, world_size=4)
    with pytest.raises(ConfigError, match="saliency mask not found"):
        load_mask(tmp_path, rank=0, world_size=2)
    (tmp_path / "mask_rank0.pt").write_text("not a mask")
    with pytest.raises(ConfigError, match="not a dsunlearn saliency mask"):
        load_mask(tmp_path, rank=0, world_size=2)


def test_mask_filter_judges_lora_adapters_as_the_linear_they_adapt():
    """No ranks: the module filter and `linear_only` on LoRA names (issue 7). The released code
    compares the adapters' names with the Linears' own and silently selects nothing."""
    name = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert own_param_name(name) == "model.language_model.layers.0.self_attn.q_proj.weight"
    assert own_param_name(name.replace("lora_A", "lora_B")) == own_param_name(name)
    assert (
        own_param_name("module.model.visual.merger.mlp.0.bias") == "model.visual.merger.mlp.0.bias"
    )

    base, _ = load_model_and_processor("tiny-llava", seed=0)
    # Adapters on the language model's and the vision tower's q_proj, and on the output head.
    model = apply_lora(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    def picked(**spec) -> set[str]:
        selected = mask_filter(model, MaskConfig(**spec))
        return {n for n in trainable if selected(n)}

    language = {n for n in trainable if ".language_model." in n and ".q_proj." in n}
    vision = {n for n in trainable if ".vision_tower." in n}
    head = {n for n in trainable if ".lm_head." in n}
    assert language and vision and head and language | vision | head == set(trainable)
    assert picked(modules="language") == language  # the head is no block Linear
    assert picked(modules="language", linear_only=False) == language | head
    assert picked(modules="vision") == vision
    assert picked(modules="both") == language | vision

    # The former test: the parameter's name among the block Linears' weights. No adapter's
    # (peft-prefixed) name is one, so the mask was silently empty.
    linears = {f"{m}.weight" for m in block_linears(base)}
    assert not any(n in linears for n in trainable)

    # LoRA's default targets are the language model's Linears: modules=vision admits nothing,
    # and that is one line, not a silently empty mask.
    default = apply_lora(load_model_and_processor("tiny-llava", seed=0)[0], LoraConfig(r=4))
    names = [n for n, p in default.named_parameters() if p.requires_grad]
    assert all(mask_filter(default, MaskConfig())(n) for n in names)
    spec = MaskConfig(modules="vision")
    with pytest.raises(ConfigError, match="mask.modules=vision, mask.linear_only=true admits"):
        check_filter_admits(names, mask_filter(default, spec), spec)


def _unlearn(tmp_path, bench, vanilla, name: str, *extra: str) -> list[str]:
    return unlearn_args(
        tmp_path,
        bench,
        vanilla,
        "methods=[mmunlearner]",
        "optim.steps=2",
        "optim.batch_size=4",
        "method.mmu_max_units=2",
        "method.mmu_mask.mode=topk",  # a random model's ratio mask can be empty
        "eval.enabled=false",
        *extra,
        name=name,
    )


def test_cli_errors(capsys, tmp_path, small_bench, random_vanilla):
    # Refused when the method is built, before any rank starts: in this process.
    args = _unlearn(tmp_path, small_bench, random_vanilla, "e", "method.mmu_mask.modules=all")
    assert "saliency modules must be one of" in main_error(capsys, args)
    # LoRA adapts the language model only: a vision mask would select nothing. Refused once the
    # model is built, in a fresh process (the real exit path).
    lora_vision = ("peft.lora.r=4", "method.mmu_mask.modules=vision")
    proc = run_cli(_unlearn(tmp_path, small_bench, random_vanilla, "e", *lora_vision), tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert "mask.modules=vision, mask.linear_only=true admits none" in last, last
    assert "LoRA adapts the language model's Linears only" in last


# Run "a": the mask is computed, on the language model (the paper's default filter; demo.yaml
# picks the vision tower's), and saved with the final checkpoint.
MASK_RUN = ("checkpoint.final=true", "method.mmu_mask.modules=language")


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory, small_bench, random_vanilla) -> Path:
    """2 ranks: run "a" (MASK_RUN) of the mask tests; its output folder. Its checkpoint's mask
    is also the mid-schedule test's."""
    out = tmp_path_factory.mktemp("mmu")
    proc = run_deepspeed(2, _unlearn(out, small_bench, random_vanilla, "a", *MASK_RUN), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _mask_tag(out: Path) -> tuple[Path, Path]:
    """Run "a"'s method checkpoint folder and its latest tag folder (where the masks are)."""
    save_dir = out / "a" / "checkpoints" / "mmunlearner"
    return save_dir, save_dir / (save_dir / "latest").read_text().strip()


@pytest.mark.slow
def test_mask_is_saved_with_the_checkpoint_and_reloaded(
    tmp_path, small_bench, random_vanilla, mask_run
):
    """2 ranks: the run scores its mask, saves it beside the DeepSpeed checkpoint; a second run
    given that folder steps on the same mask (same threshold, same selection)."""
    save_dir, tag = _mask_tag(mask_run)
    assert sorted(p.name for p in tag.glob("mask_rank*.pt")) == ["mask_rank0.pt", "mask_rank1.pt"]
    info_a = json.loads((mask_run / "a" / "report.json").read_text())["method_info"]
    info_a = info_a["mmunlearner"]
    assert info_a["source"] == "computed in this run" and 0 < info_a["selected_share"] < 1

    # The method's checkpoint folder stands for its latest complete checkpoint.
    second = _unlearn(
        tmp_path, small_bench, random_vanilla, "b", MASK_RUN[1], f"method.mmu_mask_dir={save_dir}"
    )
    proc = run_deepspeed(2, second, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info_b = json.loads((tmp_path / "b" / "report.json").read_text())["method_info"]
    info_b = info_b["mmunlearner"]
    assert info_b["source"] == str(tag)
    assert (info_b["threshold"], info_b["selected_share"], info_b["spec"]) == (
        info_a["threshold"],
        info_a["selected_share"],
        info_a["spec"],
    )

    # The same folder on another world size is refused with one line.
    proc = run_cli(second, tmp_path)
    assert proc.returncode == 2
    assert "cut for world size 2, this run has 1" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
def test_no_forget_gradient_reaches_an_unselected_weight_mid_schedule(
    tmp_path, small_bench, random_vanilla, mask_run
):
    """2 ranks, AdamW with weight decay 0.1, alternating masked forget / unmasked retain steps.
    Two runs that differ only in the last forget gradient end with every unselected weight
    bit-identical; the retain steps' momentum does move them (the documented choice). The mask:
    run "a"'s (language model, top 50 %), reloaded from its checkpoint."""
    from dsunlearn.engine.dist import free_port
    from dsunlearn.recipes.demo import launch_env

    _, masks = _mask_tag(mask_run)
    out = tmp_path / "mixed.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["tests/ranks/mixed_schedule.py", str(random_vanilla), str(small_bench), str(masks)]
    cmd += [str(out), "2"]
    env = launch_env(2) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    print(report)
    assert report["same_start"]
    assert report["unselected"] > 0 and report["unselected_differ"] == 0
    assert report["selected_differ"] > 0
    assert report["unselected_moved_by_last_forget_step"] > 0


@pytest.mark.slow
def test_lora_mask_is_on_the_adapters_and_freezes_the_unselected_ones(
    tmp_path, small_bench, random_vanilla
):
    """2 ZeRO-3 ranks, peft.lora.r=4: the run scores the adapters (the trainable parameters),
    selects some of them, saves their mask beside the checkpoint; masked forget steps on that
    reloaded mask leave every unselected adapter weight bit-identical (weight decay 0.1)."""
    from dsunlearn.engine.dist import free_port
    from dsunlearn.recipes.demo import launch_env

    args = _unlearn(tmp_path, small_bench, random_vanilla, "lora", "checkpoint.final=true")
    args += ["peft.lora.r=4", "method.mmu_mask.modules=language"]
    proc = run_deepspeed(2, args, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "lora" / "report.json").read_text())["method_info"]
    info = info["mmunlearner"]
    print("selected_share", info["selected_share"])
    assert info["source"] == "computed in this run" and 0 < info["selected_share"] < 1

    save_dir = tmp_path / "lora" / "checkpoints" / "mmunlearner"
    tag = save_dir / (save_dir / "latest").read_text().strip()
    recs = [torch.load(tag / f"mask_rank{r}.pt") for r in range(2)]
    for rec in recs:
        assert rec["masks"] and all(".lora_" in n for n in rec["masks"])
    selected = sum(
        int(unpack_mask(rec["masks"][n], rec["partition_numel"][n]).sum())
        for rec in recs
        for n in rec["masks"]
    )
    assert selected > 0

    # Masked forget steps only (the schedule's retain steps are unmasked by design) on the
    # saved mask, reloaded by name into freshly wrapped adapters.
    out = tmp_path / "lora_update.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["tests/ranks/masked_update.py", str(random_vanilla), str(small_bench), str(tag)]
    cmd += [str(out), "3", "lora"]
    env = launch_env(2) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    print(report)
    assert report["selected"] == selected
    assert report["frozen"] > 0 and report["frozen_changed"] == 0
    assert report["selected_moved"] > 0
