"""DeepSpeed engines: the trained model and the frozen reference model, both ZeRO-3 sharded.

We pass our own AdamW and warm-up schedule; DeepSpeed wraps the optimizer in its ZeRO-3
partitioned optimizer, so each rank only keeps its own shard of fp32 master weights and
moments. `backward` and `step` stay separate calls so that methods can act on the reduced
gradient partition in between.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from dsunlearn.config import OptimConfig
from dsunlearn.engine.dist import any_rank, get_info
from dsunlearn.errors import TrainingError


def _param_ndim(p: torch.nn.Parameter) -> int:
    # Under ZeRO-3 the local tensor is an empty placeholder; ds_shape is the real shape.
    return len(getattr(p, "ds_shape", p.shape))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and embeddings' 1-D params are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if _param_ndim(p) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_train_engine(model: torch.nn.Module, optim: OptimConfig, ds_config: dict[str, Any]):
    """Wrap `model` in a DeepSpeed engine with AdamW and a linear warm-up."""
    import deepspeed

    opt = torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=tuple(optim.betas),
        weight_decay=optim.weight_decay,
    )
    warmup = max(0, optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    return engine


def build_reference_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """A frozen copy for KL/NPO: sharded like the trained model, never gathered whole."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    cfg = copy.deepcopy(ds_config)
    cfg.pop("gradient_clipping", None)
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Stop every rank together, with one clear line, when the loss is NaN or infinite."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if any_rank(bad, get_info().device):
        raise TrainingError(f"{what}: loss is not finite (NaN or inf); lower the learning rate")


def optimizer_step(
    engine,
    loss: torch.Tensor,
    what: str,
    before_step: Callable[[Any], None] | None = None,
) -> None:
    """backward, then an optional hook on the reduced local gradients, then the optimizer step."""
    check_finite(loss, what)
    engine.backward(loss)
    if before_step is not None:
        before_step(engine)
    engine.step()


def step_scalars(engine) -> dict[str, float]:
    """What to track after `engine.step()`: the current learning rate (`lr`, the first param
    group's) and, once DeepSpeed computed it, the global gradient norm of the last step before
    clipping (`grad_norm`, the same on every rank). A value DeepSpeed does not have (no optimizer,
    no step yet) is left out."""
    out: dict[str, float] = {}
    lrs = engine.get_lr()
    if lrs and lrs[0] is not None:
        out["lr"] = float(lrs[0])
    norm = engine.get_global_grad_norm()
    if norm is not None:
        out["grad_norm"] = float(norm)  # a tensor under some ZeRO stages; float() syncs once
    return out
