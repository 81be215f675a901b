"""The single-GPU fallback's engine test (`pytest -m gpu`): one CUDA rank through the real
launcher, bf16, ZeRO-3, NCCL. Multi-rank tests stay on CPU ranks: one GPU cannot host two
NCCL ranks. Without a GPU this skips, saying why; CI has none."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import REPO, run_deepspeed, unlearn_args


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (one NCCL rank)")
def test_one_rank_bf16_run_on_cuda_through_the_launcher(tmp_path, small_bench, random_vanilla):
    """GA, SIU (the fused Triton loss) and MMUnlearner, 2 iterations each, bf16 on one GPU."""
    args = unlearn_args(
        tmp_path, small_bench, random_vanilla, "name=gpu", "methods=[ga,siu,mmunlearner]",
        "optim.steps=2", "method.siu_steps=1", "method.mmu_max_units=1",
        "method.mmu_retain_per_forget=1", "model.dtype=bf16",
        f"deepspeed={REPO / 'configs' / 'deepspeed' / 'zero3_bf16.json'}",
        "eval.every=0", "eval.max_items=8", "report_to=[]",
    )  # fmt: skip
    proc = run_deepspeed(1, args, tmp_path, DS_ACCELERATOR="cuda")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "gpu"
    report = json.loads((run / "report.json").read_text())
    losses = json.loads((run / "losses.json").read_text())
    for method in ("ga", "siu", "mmunlearner"):
        assert losses[method] and all(math.isfinite(r["forget_loss"]) for r in losses[method])
    assert report["method_info"]["siu"]["loss_impl"] == "fused-triton"
