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


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config moves the optimizer to host memory
    (`zero_optimization.offload_optimizer.device` cpu or nvme)."""
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return str(offload.get("device") or "none").lower() != "none"


_STALE_LOCK_S = 600  # a build takes about a minute; a lock this old was left by a killed one


def _load_cpu_adam_op() -> None:
    """Build (first use on a machine, about a minute) or load DeepSpeed's `cpu_adam` op, or stop
    with one line that names what is missing.

    DeepSpeed JIT-compiles it with ninja and the C++ compiler into torch's extension cache
    (`$TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions/py3X_cpu/cpu_adam/). torch holds
    a `lock` file there while it builds or loads, and waits forever on one a killed build left."""
    import os
    import shutil
    import time
    from pathlib import Path

    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import _get_build_directory, is_ninja_available

    from dsunlearn.errors import ConfigError

    builder = CPUAdamBuilder()
    folder = Path(_get_build_directory(builder.name, verbose=False))
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        raise ConfigError(
            f"the build of DeepSpeed's CPU Adam op waits on {lock}, left by a build that was "
            "killed: delete that file and start again"
        )
    try:
        builder.load(verbose=False)
    except Exception as e:  # noqa: BLE001 -- anything here means the op is unusable
        cxx = os.environ.get("CXX", "c++")
        tools = (("ninja", is_ninja_available()), (cxx, shutil.which(cxx)))
        missing = [tool for tool, found in tools if not found]
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        why = f"{' and '.join(missing)} not found" if missing else cause
        raise ConfigError(
            f"offload_optimizer needs DeepSpeed's CPU Adam op, which could not be built: {why} "
            f"(it is compiled on first use with ninja and a C++ compiler such as g++, into "
            f"{folder}); or drop offload_optimizer from the DeepSpeed config"
        ) from None


def _resume_exact_cpu_adam(opt: Any) -> None:
    """Make a resumed DeepSpeedCPUAdam step exactly as the uninterrupted one would.

    The C++ optimizer keeps beta1^t and beta2^t (bias correction) as float32 products, updated
    by one multiplication per step; a fresh one (after loading a checkpoint at step k) computes
    them as pow(beta, k + 1) instead (`IncrementStep`, csrc/includes/cpu_adam.h), and the two
    differ in the last bit at some steps (beta2 = 0.999: steps 3, 6, 19..26, ...). Before a step
    whose count does not follow the last one the C++ side saw, this replays the missing
    increments on empty tensors, so it holds the same products as a run that never stopped."""
    import types

    stock_step = opt.step
    seen = [0]  # the last step count the C++ optimizer was given

    def step(self, closure=None):  # bound, as torch's LR schedulers wrap `opt.step.__func__`
        states = [opt.state[p] for g in opt.param_groups for p in g["params"] if p.grad is not None]
        done = int(states[0].get("step", 0)) if states else seen[0]
        if done not in (seen[0], seen[0] - 1):  # not the next step, nor the current one again
            group, empty = opt.param_groups[0], torch.empty(0)
            beta1, beta2 = group["betas"]
            if done < seen[0]:  # an older checkpoint: start the products from scratch
                opt.ds_opt_adam.create_adam(
                    opt.opt_id, group["lr"], beta1, beta2, group["eps"], 0.0, opt.adam_w_mode, False
                )
                seen[0] = 0
            args = (group["lr"], beta1, beta2, group["eps"], 0.0, group["bias_correction"])
            for s in range(seen[0] + 1, done + 1):  # numel 0: only the step count moves
                opt.ds_opt_adam.adam_update(opt.opt_id, s, *args, empty, empty, empty, empty)
        out = stock_step(closure)
        seen[0] = done + 1 if states else seen[0]
        return out

    opt.step = types.MethodType(step, opt)


def build_train_engine(model: torch.nn.Module, optim: OptimConfig, ds_config: dict[str, Any]):
    """Wrap `model` in a DeepSpeed engine with AdamW and a linear warm-up.

    AdamW is torch's, or DeepSpeed's `DeepSpeedCPUAdam` (AdamW mode, the same groups, lr,
    betas and decay) when the config offloads the optimizer: DeepSpeed refuses any other client
    optimizer there, and the host copies are stepped by its vectorised C++ op."""
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "weight_decay": optim.weight_decay}
    if offloads_optimizer(ds_config):
        _load_cpu_adam_op()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        _resume_exact_cpu_adam(opt)
    else:
        opt = torch.optim.AdamW(groups, **kwargs)
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
    check: bool = True,
) -> None:
    """backward, then an optional hook on the reduced local gradients, then the optimizer step.

    `check=False` leaves the finite-loss check to the caller: the unlearning loop folds it into
    its one collective per iteration (`recipes.unlearn.sync_iteration`), after the steps."""
    if check:
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
