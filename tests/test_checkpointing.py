"""Activation checkpointing (`model.gradient_checkpointing=true`): same weights, recomputed
layers, both towers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize(
    "name", ["tiny-llava", "tiny-qwen2-vl", "tiny-llava-next", "tiny-idefics3"]
)
def test_every_family_checkpoints_both_towers(name):
    from dsunlearn.models.loader import enable_activation_checkpointing, load_model_and_processor

    model, _ = load_model_and_processor(name)
    parts = enable_activation_checkpointing(model)
    assert parts["vision"] > 0 and parts["language"] > 0
    assert model.config.text_config.use_cache is False


@pytest.mark.slow
def test_two_ranks_three_steps_give_the_same_weights_with_checkpointing(
    tmp_path, small_bench, random_vanilla
):
    """GA and MMUnlearner (saliency, mask, masked forget and retain steps), 3 iterations on 2
    ZeRO-3 ranks, with and without checkpointing: fp32 weights equal within 1e-6, and with
    checkpointing each layer ran twice per forward+backward (the recompute happened)."""
    from dsunlearn.engine.dist import free_port
    from dsunlearn.recipes.demo import launch_env

    out = tmp_path / "ckpt.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["tests/ranks/checkpointing.py", str(random_vanilla), str(small_bench), str(out)]
    env = launch_env(2) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    print(report)
    for name in ("ga", "mmunlearner"):
        r = report[name]
        assert r["max_abs_moved"] > 1e-4  # the steps did train
        assert r["max_abs_diff"] <= 1e-6
        for part in ("language", "vision"):
            assert r["calls_checkpointed"][part] == 2 * r["calls_plain"][part] > 0
