"""An unlearned model that never left the ranks: its base folder plus each rank's own ZeRO-3
partitions of the weights that training changed.

`unlearn audit=true` audits each method's selected weights this way: every attack loads the
base model sharded, as for any folder, then each rank writes its kept partitions into the fresh
model's partitions (the layout is the same: same model, same world size). No rank gathers the
model and nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsunlearn.models.encode import hf_model


@dataclass
class LocalWeights:
    base: str  # the model folder the weights were trained from
    tensors: dict[str, torch.Tensor]  # parameter name -> this rank's partition (or whole weight)
    label: str  # how reports name it (the method)

    def __str__(self) -> str:
        return f"{self.label} (selected weights, on {self.base})"


def capture_local(module: Any, base: str, label: str) -> LocalWeights:
    """Host copies of this rank's share of every trainable weight of `module` (the fp32 master
    partition under ZeRO-3, which the optimizer steps on)."""
    from deepspeed.utils import safe_get_local_fp32_param

    out = {}
    for name, p in hf_model(module).named_parameters():
        if p.requires_grad:
            local = safe_get_local_fp32_param(p) if hasattr(p, "ds_id") else p.detach()
            out[name] = local.detach().to("cpu", copy=True)
    return LocalWeights(base, out, label)


def put_local(engine: Any, weights: LocalWeights) -> None:
    """Write `weights` into a freshly built engine's partitions (and into its optimizer's fp32
    master partitions, if it has an optimizer); every name must be found."""
    from deepspeed.utils import safe_set_local_fp32_param

    params = dict(hf_model(engine.module).named_parameters())
    missing = sorted(set(weights.tensors) - set(params))
    if missing:
        raise RuntimeError(f"{weights.label}: no parameter {missing[0]} in {weights.base}")
    trains = getattr(engine, "optimizer", None) is not None
    with torch.no_grad():
        for name, t in weights.tensors.items():
            p = params[name]
            if hasattr(p, "ds_id"):
                if trains and p.requires_grad:
                    safe_set_local_fp32_param(p, t.to(p.ds_tensor.device))
                p.ds_tensor.data.copy_(t.view_as(p.ds_tensor.data))
            else:
                p.data.copy_(t)
