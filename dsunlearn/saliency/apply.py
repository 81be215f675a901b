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

In the alternating schedule the retain step is unmasked and decays every matrix (`phase`
"retain"), as torch's AdamW would. What may move an unselected weight in a *forget* step is
then only the Adam momentum the retain steps left: retain signal, kept on purpose. Freezing
it too would need a copy of the fp32 partition per step; what is guaranteed and tested is that
no forget gradient ever reaches an unselected weight.
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
                raise ConfigError(
                    f"the saliency mask has no entry for trainable parameter {name}: it was "
                    "built for other trainable parameters (same model and peft.lora settings?)"
                )
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
        self._counts = (
            int(flat.sum()),
            sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        )

    def selected_counts(self) -> tuple[int, int]:
        """(weights selected, trainable weights) over all ranks."""
        from dsunlearn.engine.dist import all_reduce_sum

        local = torch.tensor([self._counts[0]], dtype=torch.int64, device=self.packed.device)
        selected = all_reduce_sum(local)
        return int(selected.item()), self._counts[1]

    def mask_gradients(self) -> None:
        mask_apply_(self.engine.optimizer.grad_partitions_flat_buffer, self.packed)

    def weight_decay_(self, masked: bool) -> None:
        """AdamW's decoupled decay, p *= 1 - lr * wd, before the step (as torch's AdamW does);
        on the selected entries only when `masked`."""
        if self.weight_decay == 0.0:
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        lr = float(self.engine.get_lr()[0])
        factor = 1.0 - lr * self.weight_decay
        for p, m in self.decayed:
            value = safe_get_local_fp32_param(p)
            if value is None:
                continue
            if masked:
                value = torch.where(m.to(value.device), value * factor, value)
            else:
                value = value * factor
            safe_set_local_fp32_param(p, value)

    def before_step(self, _engine: Any = None, phase: str = "forget") -> None:
        """Forget step: mask the gradient, decay the selected weights. Retain step: no mask,
        decay every matrix."""
        if phase == "forget":
            self.mask_gradients()
        elif phase != "retain":
            raise ValueError(f"unknown step phase '{phase}'")
        self.weight_decay_(masked=phase == "forget")
