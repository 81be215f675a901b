"""Importance scores F = squared gradients summed per unit, on each rank's own ZeRO-3 partition.

Why the pass is shaped like this:
- Under ZeRO-3 the reduced gradient of a parameter lives only as this rank's partition
  (`deepspeed.utils.safe_get_local_grad`, fp32). F_forget and F_preserve are fp32 buffers of
  exactly that size, so the pass holds 2 x partition extra, never a full parameter.
- The score must not depend on the world size. One *unit* is a global batch cut into a fixed
  number of micro-batches (`micro_batches_per_unit`); a rank runs its share of them with
  gradients accumulating, each micro-loss scaled by 1 / (its share), and DeepSpeed averages the
  ranks' sums. With 1 rank and 2 micro-batches that is g_a/2 + g_b/2; with 2 ranks it is
  (g_a + g_b)/2: the same bits, since halving is exact. (With more ranks the sum order of the
  collective may differ from the accumulation order, so equality is then up to fp32 rounding.)
- g^2 is added after each unit, then the gradients are cleared; no optimizer step is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def local_partition_numel(param: torch.nn.Parameter) -> int:
    """Elements of this rank's partition of `param` (padded on the last rank), or its numel."""
    ds_tensor = getattr(param, "ds_tensor", None)
    return ds_tensor.numel() if ds_tensor is not None else param.numel()


def real_element_count(param: torch.nn.Parameter, rank: int) -> int:
    """How many of this rank's partition elements are real (the rest pads the last rank)."""
    total = int(getattr(param, "ds_numel", param.numel()))
    part = local_partition_numel(param)
    if not hasattr(param, "ds_tensor"):
        return total
    return max(0, min(part, total - rank * part))


def local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's reduced fp32 gradient partition (ZeRO-3), or the plain fp32 gradient."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_grad

        g = safe_get_local_grad(param)
    else:
        g = param.grad
    return None if g is None else g.detach().float().reshape(-1)


@dataclass
class Scores:
    """F_forget and F_preserve per parameter name, each the size of the local partition."""

    forget: dict[str, torch.Tensor] = field(default_factory=dict)
    preserve: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def zeros(cls, named_params: Iterable[tuple[str, torch.nn.Parameter]], device) -> Scores:
        out = cls()
        for name, p in named_params:
            n = local_partition_numel(p)
            out.forget[name] = torch.zeros(n, dtype=torch.float32, device=device)
            out.preserve[name] = torch.zeros(n, dtype=torch.float32, device=device)
        return out

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for d in (self.forget, self.preserve) for t in d.values()
        )


def accumulate_units(
    engine: Any,
    named_params: list[tuple[str, torch.nn.Parameter]],
    into: dict[str, torch.Tensor],
    units: Iterator[list[Batch]],
    loss_fn: Callable[[Any, Batch], torch.Tensor],
    after_backward: Callable[[], None] = lambda: None,
    select: Callable[[str], bool] = lambda _name: True,
) -> int:
    """For each unit (this rank's micro-batches of one global batch): forward + backward of
    every micro-batch with gradients accumulating, then into[name] += g^2 on the local partition
    for the selected parameters, then clear the gradients. Returns the number of units.
    `after_backward` runs after each backward (to release the lm_head a fused loss gathered)."""
    count = 0
    for micro_batches in units:
        share = len(micro_batches)
        for batch in micro_batches:
            loss = loss_fn(engine, batch) / share
            engine.backward(loss, scale_wrt_gas=False)
            after_backward()
        for name, p in named_params:
            if not select(name):
                continue
            g = local_grad(p)
            if g is not None:
                into[name].addcmul_(g, g)
        # A DeepSpeed engine clears its gradient partitions through its ZeRO optimizer.
        zero_grad = getattr(getattr(engine, "optimizer", None), "zero_grad", engine.zero_grad)
        zero_grad()
        count += 1
    return count
