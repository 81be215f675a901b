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

Under optimizer offload (`zero_optimization.offload_optimizer`, DeepSpeedCPUAdam) the optimizer
does not read that buffer: with DeepSpeed's default (managed) gradient accumulation,
`partition_grads` copies each reduced partition, at the accumulation boundary, during the
backward, into a host fp32 buffer per sub-group, `fp32_partitioned_groups_flat[i].grad`
(`_offload_grad_partition_at_boundary`, stage3.py), and records that partition's norm for
clipping (`norm_for_param_grads`). Masking `grad_partitions_flat_buffer` after the backward
would reach neither. So under offload `before_step` also masks each sub-group's host fp32
gradient (its own packed mask: the sub-group's parameters in `fp16_groups[i]` order, the layout
of `grad_position`) and recomputes the recorded norms from the masked gradient (mask, then clip,
as without offload). The flat buffer is still masked: the overflow check reads it, and with
`managed_gradient_accumulation=false` `engine.step` copies it to the host buffers afresh. The
decay is then applied in place to the host fp32 master partition (same arithmetic). NVMe
offload (gradients swapped out to disk) is refused.

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
        self.engine = engine
        self.params = params
        # Optimizer offload: the host fp32 gradient of each sub-group gets its own packed mask.
        self.offload = bool(getattr(optimizer, "offload_optimizer", False))
        self.host_packed = self._host_masks(optimizer, parts) if self.offload else []
        # AdamW decays matrices only (`engine.param_groups`): the same weights decay here.
        self.decayed = [
            (p, m.to(self._host_master(p).device) if self.offload else m)
            for p, m in zip(params, parts, strict=True)
            if len(getattr(p, "ds_shape", p.shape)) >= 2
        ]
        self.weight_decay = weight_decay
        self._counts = (
            int(flat.sum()),
            sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        )

    @staticmethod
    def _host_masks(optimizer: Any, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One packed mask per sub-group, for its host fp32 gradient buffer."""
        if getattr(optimizer, "swap_optimizer", False):
            raise ConfigError(
                "the masked update supports offload_optimizer on cpu, not nvme: the gradients "
                "it masks are swapped out to disk there"
            )
        out, start = [], 0
        for i, group in enumerate(optimizer.fp16_groups):
            grad = optimizer.fp32_partitioned_groups_flat[i].grad
            group_mask = torch.cat(parts[start : start + len(group)])
            start += len(group)
            if grad is None or grad.numel() != group_mask.numel():
                raise ConfigError(
                    f"offloaded gradient buffer of sub-group {i} does not match its parameters' "
                    "partitions: this DeepSpeed version lays it out differently"
                )
            out.append(pack_mask(group_mask).to(grad.device))
        return out

    def _host_slice(self, p: torch.nn.Parameter, grad: bool) -> torch.Tensor:
        """Under offload: p's slice of its sub-group's host fp32 master (or gradient) buffer."""
        optimizer = self.engine.optimizer
        i, offset, numel = optimizer.grad_position[optimizer.get_param_id(p)]
        flat = optimizer.fp32_partitioned_groups_flat[i]
        return (flat.grad if grad else flat.detach()).narrow(0, offset, numel)  # same storage

    def _host_master(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self._host_slice(p, grad=False)

    def selected_counts(self) -> tuple[int, int]:
        """(weights selected, trainable weights) over all ranks."""
        from dsunlearn.engine.dist import all_reduce_sum

        local = torch.tensor([self._counts[0]], dtype=torch.int64, device=self.packed.device)
        selected = all_reduce_sum(local)
        return int(selected.item()), self._counts[1]

    def mask_gradients(self) -> None:
        optimizer = self.engine.optimizer
        mask_apply_(optimizer.grad_partitions_flat_buffer, self.packed)
        if not self.offload:
            return
        # What DeepSpeedCPUAdam steps on, already copied there during the backward.
        for i, packed in enumerate(self.host_packed):
            mask_apply_(optimizer.fp32_partitioned_groups_flat[i].grad, packed)
        # The clipping norm DeepSpeed recorded per partition at that copy: the masked one's.
        norms = optimizer.norm_for_param_grads
        for p in self.params:
            pid = optimizer.get_param_id(p)
            if pid in norms:
                norms[pid] = optimizer._constant_buffered_norm2(self._host_slice(p, grad=True))

    def weight_decay_(self, masked: bool) -> None:
        """AdamW's decoupled decay, p *= 1 - lr * wd, before the step (as torch's AdamW does);
        on the selected entries only when `masked`."""
        if self.weight_decay == 0.0:
            return
        lr = float(self.engine.get_lr()[0])
        factor = 1.0 - lr * self.weight_decay
        if self.offload:  # in place on the host fp32 master partition
            for p, m in self.decayed:
                master = self._host_master(p)
                if masked:
                    master.copy_(torch.where(m, master * factor, master))
                else:
                    master.mul_(factor)
            return
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

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
