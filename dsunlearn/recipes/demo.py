"""The demo: built-in data, the learned vanilla model, four baselines on N ZeRO-3 ranks.

The unlearning itself runs under the real `deepspeed` launcher (one process per rank), exactly
as a user would start it; this process only prepares the inputs and waits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsunlearn.cache import REPO_ROOT, find_learned, is_complete, vanilla_dir
from dsunlearn.config import LearnConfig, UnlearnConfig, load_config
from dsunlearn.engine.dist import free_port
from dsunlearn.errors import ConfigError, DsunlearnError

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def deepspeed_launch_cmd(ranks: int, args: list[str]) -> list[str]:
    """`deepspeed --num_gpus N --module dsunlearn ARGS` with the venv's own launcher."""
    launcher = Path(sys.executable).with_name("deepspeed")
    exe = str(launcher) if launcher.exists() else shutil.which("deepspeed")
    if exe is None:
        raise DsunlearnError("the `deepspeed` launcher is not on PATH; install deepspeed")
    return [
        exe,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--module",
        "dsunlearn",
        *args,
    ]


def launch_env(ranks: int) -> dict[str, str]:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Share the cores between ranks instead of oversubscribing them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_demo(config: str | None, overrides: list[str], ranks: int) -> Path:
    t0 = time.time()
    cfg_path = Path(config) if config else DEMO_CONFIG
    cfg = load_config(UnlearnConfig, cfg_path, overrides)
    if ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {ranks}")

    learn_cfg = LearnConfig(data=cfg.data, model=cfg.model, seed=cfg.seed)
    if cfg.vanilla is None and not is_complete(find_learned(learn_cfg)):
        print(f"no cached vanilla model at {vanilla_dir(learn_cfg)}: learning it first (slow)")
        from dsunlearn.recipes.learn import run_learn

        run_learn(learn_cfg)

    run_dir = Path(cfg.out_dir) / cfg.name
    cmd = deepspeed_launch_cmd(ranks, ["unlearn", "--config", str(cfg_path), *overrides])
    print("launching:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=launch_env(ranks))
    if proc.returncode != 0:
        raise DsunlearnError(f"unlearning failed on {ranks} ranks (exit code {proc.returncode})")
    elapsed = time.time() - t0
    report = run_dir / "report.json"
    print(f"\ndemo finished in {elapsed:.1f} s ({elapsed / 60:.1f} min)")
    print(f"report: {report}")
    print(f"        {run_dir / 'report.md'}")
    print(f"        {run_dir / 'report.png'}")
    md = run_dir / "report.md"
    if md.exists():
        print("\n" + md.read_text())
    return report
