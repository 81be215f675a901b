"""The weights of one step kept aside on every rank, as that rank's own ZeRO-3 partitions.

In-run selection may pick a step before the last one. Each rank then keeps a host copy of its
own partition of every trainable weight at the selected step (the fp32 master partition that
DeepSpeed's optimizer steps on): no rank ever gathers the model. At the end the copy goes back
into the optimizer's fp32 partition and into the module's partition, so the test evaluation,
the final checkpoint and `dsunlearn export` all see the selected weights. A checkpoint carries
the copy in each rank's resume file, so a preempted run selects the same weights.

Without ZeRO-3 (a plain DDP engine holds whole weights on every rank) the module's own
parameters are copied instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _trainable(engine: Any) -> list[torch.nn.Parameter]:
    return [p for p in engine.module.parameters() if p.requires_grad]


@dataclass
class Snapshot:
    step: int
    tensors: list[torch.Tensor]  # host copies, in `_trainable` order

    @classmethod
    def capture(cls, engine: Any, step: int) -> Snapshot:
        from deepspeed.utils import safe_get_local_fp32_param

        out = []
        for p in _trainable(engine):
            local = safe_get_local_fp32_param(p) if hasattr(p, "ds_id") else p.detach()
            out.append(local.detach().to("cpu", copy=True))
        return cls(step, out)

    def restore(self, engine: Any) -> None:
        """Put the kept weights back into the optimizer's and the module's partitions."""
        from deepspeed.utils import safe_set_local_fp32_param

        params = _trainable(engine)
        if len(params) != len(self.tensors):
            raise RuntimeError(f"snapshot of {len(self.tensors)} weights for {len(params)}")
        with torch.no_grad():
            for p, t in zip(params, self.tensors, strict=True):
                if hasattr(p, "ds_id"):
                    safe_set_local_fp32_param(p, t.to(p.ds_tensor.device))
                    p.ds_tensor.data.copy_(t.view_as(p.ds_tensor.data))
                else:
                    p.data.copy_(t)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tensors": self.tensors}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Snapshot | None:
        return None if state is None else cls(state["step"], list(state["tensors"]))
