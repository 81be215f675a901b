"""Pieces every recipe shares: getting the benchmark, the DeepSpeed config, batches, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsunlearn.config import DataConfig, ModelConfig, OptimConfig
from dsunlearn.data.builtin import build_benchmark
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.engine.batches import to_device
from dsunlearn.engine.dist import DistInfo, barrier
from dsunlearn.engine.ds_config import fill_ds_config, read_ds_config, zero_stage
from dsunlearn.errors import ConfigError
from dsunlearn.models.encode import encode_examples

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got '{cfg.dtype}'")
    return DTYPES[cfg.dtype]


def prepare_benchmark(cfg: DataConfig, info: DistInfo):
    """Load the benchmark; the built-in one is generated first (by rank 0) if missing."""
    path = cfg.resolved_path()
    if cfg.path is None and not Path(path).exists():
        if info.is_main:
            build_benchmark(path, seed=cfg.seed, entities=cfg.entities, forget_pct=cfg.forget_pct)
        barrier()
    return load_benchmark(path, forget_pct=cfg.forget_pct)


def deepspeed_config(
    path: str, optim: OptimConfig, model: ModelConfig, info: DistInfo
) -> dict[str, Any]:
    ds = read_ds_config(path)
    return fill_ds_config(
        ds,
        global_batch=optim.batch_size,
        world_size=info.world_size,
        grad_clip=optim.grad_clip,
        bf16=model_dtype(model) == torch.bfloat16,
    )


def is_zero3(ds_config: dict[str, Any]) -> bool:
    return zero_stage(ds_config) == 3


def encode_batch(processor: Any, examples: list[Any], device: torch.device) -> dict[str, Any]:
    """Tokenise (question, image, answer) examples into a training batch on `device`."""
    return to_device(encode_examples(processor, examples), device)


def full_state_dict(model: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); gathers ZeRO-3 shards.

    For the tiny models this is cheap; large models are exported from checkpoints instead.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if not zero3:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if rank == 0:
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return None
