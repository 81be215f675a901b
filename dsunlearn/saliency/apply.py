"""The masked update: only salient weights move in a forget step, on each rank's partition.

Between `engine.backward` (its reduce-scatter done) and `engine.step`, `before_step`:
1. zeroes the unselected entries of this rank's gradient partition in place: the whole
   `grad_partitions_flat_buffer` of DeepSpeed's stage-3 optimizer in one call of
   `kernels.mask_apply.mask_apply_` (see that file for why this buffer). Its layout is every
   trainable parameter's partition in `chain(*optimizer.fp16_groups)` order, which is the order
   the flat mask is built in here;
2. applies AdamW's decoupled weight decay itself, to the selected entries of the fp32 master
   partition only (the engine's optimizer then runs with weight_decay = 0): torch's AdamW
   decays every weight, which would move the frozen ones.

With both, an unselected weight sees a zero gradient, zero Adam moments (in a forget-only run)
and no decay, so it stays bit-identical. Clipping: DeepSpeed clips inside `step`, by the norm of
the gradient partitions it then reads, i.e. *after* this mask (mask, then clip: the frozen
weights' gradients do not shrink the salient ones' update). The paper clips, then masks.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from dsunlearn.errors import ConfigError
from kernels.mask_apply import mask_apply_, pack_mask


class MaskedUpdate:
    """Holds this rank's packed mask and applies it before each forget step."""

    def __init__(self, engine: Any, masks: dict[str, torch.Tensor], weight_decay: float) -> None:
        optimizer = engine.optimizer
        if not hasattr(optimizer, "grad_partitions_flat_buffer"):
            raise ConfigError("the masked update needs DeepSpeed ZeRO stage 3")
        names = {id(p): n for n, p in engine.module.named_parameters()}
        params = list(itertools.chain.from_iterable(optimizer.fp16_groups))
        parts = []
        for p in params:
            name = names[id(p)]
            if name not in masks:
                raise ConfigError(f"the saliency mask has no entry for parameter {name}")
            m = masks[name]
            if m.numel() != p.partition_numel():
                raise ConfigError(
                    f"mask of {name} has {m.numel()} elements, the local partition "
                    f"{p.partition_numel()}: build the mask with the same world size"
                )
            parts.append(m.to(torch.bool))
        flat = torch.cat(parts)
        self.packed = pack_mask(flat).to(optimizer.grad_partitions_flat_buffer.device)
        # AdamW decays matrices only (`engine.param_groups`): the same weights decay here.
        self.decayed = [
            (p, m)
            for p, m in zip(params, parts, strict=True)
            if len(getattr(p, "ds_shape", p.shape)) >= 2
        ]
        self.weight_decay = weight_decay
        self.engine = engine

    def mask_gradients(self) -> None:
        mask_apply_(self.engine.optimizer.grad_partitions_flat_buffer, self.packed)

    def masked_weight_decay(self) -> None:
        if self.weight_decay == 0.0:
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        lr = float(self.engine.get_lr()[0])
        factor = 1.0 - lr * self.weight_decay
        for p, m in self.decayed:
            value = safe_get_local_fp32_param(p)
            if value is None:
                continue
            mask = m.to(value.device)
            safe_set_local_fp32_param(p, torch.where(mask, value * factor, value))

    def before_step(self, _engine: Any = None) -> None:
        self.mask_gradients()
        self.masked_weight_decay()
