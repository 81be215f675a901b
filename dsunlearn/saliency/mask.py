"""The saliency mask from partitioned scores, identical on any world size.

S = (F_forget + eps) / (F_preserve + eps), elementwise on each rank's partition. Modes:
- ``ratio`` (MMUnlearner): S >= tau;
- ``topk`` (SalUn): the top `topk_pct` % of S over every selected parameter. The threshold is
  the k-th largest score, found by bisection over the bit patterns of non-negative float32
  values (order-preserving as integers): 32 rounds of one all-reduced int64 count each. No rank
  ever sees another rank's scores, and the selected count is k plus the ties at the threshold.
Parameters outside the module filter, and the padding of the last rank's partition, are never
selected (the update leaves them alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsunlearn.config import MaskConfig
from dsunlearn.engine.dist import all_reduce_sum
from dsunlearn.errors import ConfigError

MODES = ("ratio", "topk")
MODULES = ("vision", "language", "both")


def check_spec(spec: MaskConfig) -> None:
    if spec.mode not in MODES:
        raise ConfigError(f"saliency mode must be one of {MODES}, got {spec.mode!r}")
    if spec.modules not in MODULES:
        raise ConfigError(f"saliency modules must be one of {MODULES}, got {spec.modules!r}")
    if not 0.0 < spec.topk_pct <= 100.0:
        raise ConfigError(f"saliency topk_pct must be in (0, 100], got {spec.topk_pct}")


def scores_ratio(f_forget: torch.Tensor, f_preserve: torch.Tensor, eps: float) -> torch.Tensor:
    return (f_forget + eps) / (f_preserve + eps)


def _as_ordered_int(x: torch.Tensor) -> torch.Tensor:
    """float32 >= 0 -> int64 with the same order (IEEE bit patterns of non-negatives)."""
    return x.float().contiguous().view(torch.int32).to(torch.int64)


def kth_largest(local_scores: list[torch.Tensor], k: int, device) -> float:
    """The k-th largest value over the scores of every rank (each rank passes its own)."""
    ints = [_as_ordered_int(s) for s in local_scores if s.numel()]
    lo, hi = 0, 0x7F800000  # [0, +inf] as bit patterns
    # Invariant: count(S >= lo) >= k and count(S >= hi + 1) < k.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        local = sum(int((t >= mid).sum()) for t in ints)
        total = int(all_reduce_sum(torch.tensor([local], dtype=torch.int64, device=device)))
        if total >= k:
            lo = mid
        else:
            hi = mid - 1
    return torch.tensor([lo], dtype=torch.int32).view(torch.float32).item()


def build_masks(
    f_forget: dict[str, torch.Tensor],
    f_preserve: dict[str, torch.Tensor],
    real: dict[str, int],
    selected: Callable[[str], bool],
    spec: MaskConfig,
    device,
) -> tuple[dict[str, torch.Tensor], float]:
    """Boolean masks (local partition size) and the threshold used. `real[name]` is how many
    leading partition elements are real; `selected(name)` applies the module filter."""
    check_spec(spec)
    scores: dict[str, torch.Tensor] = {}
    for name, ff in f_forget.items():
        s = scores_ratio(ff, f_preserve[name], spec.eps)
        s[real[name] :] = 0.0  # padding never selected (and never counted)
        scores[name] = s
    names = [n for n in scores if selected(n)]
    if spec.mode == "ratio":
        threshold = float(spec.tau)
    else:
        n_local = sum(real[n] for n in names)
        n_total = int(all_reduce_sum(torch.tensor([n_local], dtype=torch.int64, device=device)))
        k = max(1, round(n_total * spec.topk_pct / 100.0))
        threshold = kth_largest([scores[n][: real[n]] for n in names], k, device)
    masks = {}
    for name, s in scores.items():
        m = torch.zeros_like(s, dtype=torch.bool)
        if selected(name):
            m[: real[name]] = s[: real[name]] >= threshold
        masks[name] = m
    return masks, threshold
