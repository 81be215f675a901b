"""MLP neurons: where they are, their activation statistics, and pruning them on partitions.

What a neuron is, per module type:
- a LLaMA/Qwen2-style MLP (`gate_proj`, `up_proj`, `down_proj`): intermediate channel j, whose
  activation is act(gate_j(x)) * up_j(x), the j-th input of `down_proj`;
- a CLIP/SigLIP/Qwen2-VL-vision MLP (`fc1`, act, `fc2`): channel j of act(fc1(x)), the j-th input
  of `fc2`.
Its activations are read with a forward pre-hook on the second projection (`down_proj`, `fc2`).
Pruning neuron j zeroes row j (and bias j) of the first projection(s): gate_j = 0 gives
silu(0) * up_j = 0, and fc1_j = 0 gives gelu(0) = 0 (quick_gelu too), so the neuron's output is
exactly 0 on every input while `down_proj`/`fc2` are left as they were.

Statistics per neuron are sums over the tokens a rank saw (n, sum |a|, count |a| > tau, sum a,
sum a^2), all-reduced, so every rank holds the same totals and picks the same neurons. Pruning
writes each rank's own ZeRO-3 partition of the rows (a partition is a contiguous slice of the
flattened weight): no rank gathers a weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dsunlearn.engine.dist import all_reduce_sum
from dsunlearn.models.families import family_of, strip_wrappers, unwrapped

# Module names of the two MLP layouts: (first projections, the projection that reads the neurons)
_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"))
STATS = ("abs", "freq", "var", "rms")


@dataclass(frozen=True)
class NeuronSite:
    """One MLP: its name, its part (vision or language), its first projections and reader."""

    name: str
    part: str
    inputs: tuple[torch.nn.Linear, ...]
    reader: torch.nn.Linear

    @property
    def width(self) -> int:
        return self.reader.in_features


def neuron_sites(model: Any) -> list[NeuronSite]:
    """Every MLP of the vision tower and of the language model, in module order."""
    fam = family_of(model)
    sites = []
    for name, module in unwrapped(model).named_modules():
        part = fam.part(strip_wrappers(name))
        if part not in ("vision", "language"):
            continue  # the projector's MLP is neither modality's
        for firsts, reader in _LAYOUTS:
            children = dict(module.named_children())
            if all(isinstance(children.get(n), torch.nn.Linear) for n in (*firsts, reader)):
                ins = tuple(children[n] for n in firsts)
                sites.append(NeuronSite(strip_wrappers(name), part, ins, children[reader]))
    return sites


class NeuronStats:
    """Per-site running sums of neuron activations, fed by hooks while the model runs."""

    def __init__(self, sites: list[NeuronSite], threshold: float, device) -> None:
        self.sites = sites
        self.threshold = threshold
        # [5, width] per site: n, sum |a|, count |a| > tau, sum a, sum a^2 (fp64: many tokens)
        self.sums = {
            s.name: torch.zeros(5, s.width, dtype=torch.float64, device=device) for s in sites
        }
        self.token_mask: torch.Tensor | None = None  # [B, T] for language activations
        self.enabled = True  # off for a forward that only keeps the ranks in step

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [s.reader.register_forward_pre_hook(self._hook(s)) for s in self.sites]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, site: NeuronSite):
        def hook(_module, args):
            if not self.enabled:
                return
            a = args[0].detach()
            if site.part == "language" and self.token_mask is not None and a.dim() == 3:
                a = a[self.token_mask.to(a.device, torch.bool)]  # real tokens only, no padding
            a = a.reshape(-1, a.shape[-1]).double()
            s = self.sums[site.name]
            s[0] += a.shape[0]
            s[1] += a.abs().sum(0)
            s[2] += (a.abs() > self.threshold).sum(0)
            s[3] += a.sum(0)
            s[4] += a.pow(2).sum(0)

        return hook

    def reduce(self) -> None:
        """Sum the ranks' totals (every rank then holds the same)."""
        for name, s in self.sums.items():
            self.sums[name] = all_reduce_sum(s)

    def importance(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per site, the four importance functions of each neuron: mean |a|, the share of
        tokens with |a| > tau, the standard deviation of a, and its root mean square."""
        out = {}
        for name, s in self.sums.items():
            n = s[0].clamp(min=1)
            mean, mean_sq = s[3] / n, s[4] / n
            out[name] = {
                "abs": s[1] / n,
                "freq": s[2] / n,
                "var": (mean_sq - mean.pow(2)).clamp(min=0).sqrt(),
                "rms": mean_sq.sqrt(),
            }
        return out


def forget_scores(
    forget: dict[str, dict[str, torch.Tensor]],
    retain: dict[str, dict[str, torch.Tensor]],
    weights: dict[str, float],
    eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """Per site: sum_k w_k * (I_k(forget) / (I_k(retain) + eps) - 1), the MANU code's form: how
    much more a neuron fires on the forget data than on the retain data."""
    return {
        name: sum(w * (forget[name][k] / (retain[name][k] + eps) - 1) for k, w in weights.items())
        for name in forget
    }


def top_neurons(scores: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """The `share` of all neurons in `scores` with the highest scores (one threshold across
    sites; ties broken by site order and index, so every rank picks the same): site -> ids."""
    flat = torch.cat([scores[n].reshape(-1) for n in scores])
    k = round(share * flat.numel())
    if k <= 0:
        return {n: torch.empty(0, dtype=torch.long) for n in scores}
    order = torch.sort(flat.cpu(), descending=True, stable=True).indices[:k]
    picked: dict[str, torch.Tensor] = {}
    start = 0
    for n in scores:
        width = scores[n].numel()
        ids = order[(order >= start) & (order < start + width)] - start
        picked[n] = torch.sort(ids).values
        start += width
    return picked


def _zero_rows_of_partition(param: torch.nn.Parameter, rows: torch.Tensor, rank: int) -> None:
    """Zero rows `rows` of `param` ([out, in] or bias [out]) in this rank's own partition: the
    module's partition and, for a trained parameter, the optimizer's fp32 master copy."""
    row_len = param.ds_shape[1] if len(param.ds_shape) == 2 else 1
    part = param.ds_tensor.numel()
    lo = rank * part
    flat = torch.arange(lo, lo + part, device=param.ds_tensor.device)
    kill = torch.isin(flat // row_len, rows.to(flat.device)) & (flat < param.ds_numel)
    if not kill.any():
        return
    param.ds_tensor.data[kill] = 0
    if param.requires_grad:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(param)
        if master is not None:
            master = master.detach().clone().reshape(-1)
            master[kill] = 0
            safe_set_local_fp32_param(param, master.view_as(param.ds_tensor))


@torch.no_grad()
def prune(sites: list[NeuronSite], picked: dict[str, torch.Tensor], rank: int) -> int:
    """Zero the picked neurons' rows of each site's first projections; the count pruned."""
    count = 0
    for site in sites:
        rows = picked.get(site.name)
        if rows is None or not len(rows):
            continue
        count += len(rows)
        for linear in site.inputs:
            for p in (linear.weight, linear.bias):
                if p is None:
                    continue
                if hasattr(p, "ds_id"):
                    _zero_rows_of_partition(p, rows, rank)
                else:
                    p.data[rows.to(p.device)] = 0
    return count
