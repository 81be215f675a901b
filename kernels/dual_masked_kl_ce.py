"""alpha * CE + beta * Dual Masked KL (SIU), fused with the lm_head matmul.

Per row i, with z = h_i W^T + b (trained model) and r = ref_h_i Wr^T + br (frozen reference):

    log q = log_softmax(z), log p = log_softmax(r)       (both over the FULL vocabulary)
    ce_i  = -log q[labels_i]                              if labels_i != -100, else 0
    kl_i  = sum_{v not in drop_ids} p_v (log p_v - log q_v)
                                                          if labels_i != -100 and not token_mask_i
    "mean": alpha * sum(ce) / max(1, n_ce) + beta * sum(kl) / max(1, n_kl)
    "sum":  alpha * sum(ce) + beta * sum(kl)
    "none": alpha * ce_i + beta * kl_i                    (shape [N])

The vocabulary mask is applied after the softmax: the dropped entries are zeroed in both p and q,
never renormalised. The token mask removes whole rows from the KL (and from n_kl). Gradients
reach h, weight and bias only; the reference model is evaluated under no_grad.

``dual_masked_kl_ce_reference`` is plain torch (full [N, V] logits) and is the ground truth.
``dual_masked_kl_ce`` dispatches to the fused Triton path (chunks of rows, one Triton program per
row, logit gradients computed in forward) or to the reference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it everything falls back to the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def _as_drop_ids(drop_ids: torch.Tensor | Sequence[int] | None, device) -> torch.Tensor:
    if drop_ids is None:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.as_tensor(drop_ids, dtype=torch.long, device=device).reshape(-1)


def _check(h, weight, ref_h, ref_weight, labels, token_mask, reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if h.dim() != 2 or ref_h.dim() != 2:
        raise ValueError("h and ref_h must be 2-D [N, H]")
    n = h.shape[0]
    if ref_h.shape[0] != n or labels.shape != (n,) or token_mask.shape != (n,):
        raise ValueError("h, ref_h, labels and token_mask must agree on N")
    if weight.shape[0] != ref_weight.shape[0]:
        raise ValueError("weight and ref_weight must share the vocabulary size V")
    if weight.shape[1] != h.shape[1] or ref_weight.shape[1] != ref_h.shape[1]:
        raise ValueError("hidden sizes of h/weight or ref_h/ref_weight disagree")


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def dual_masked_kl_ce_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    ref_h: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    token_mask: torch.Tensor,
    drop_ids: torch.Tensor | Sequence[int] | None,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain torch alpha*CE + beta*DMK over full [N, V] logits (log_softmax in fp32)."""
    _check(h, weight, ref_h, ref_weight, labels, token_mask, reduction)
    vocab = weight.shape[0]
    z = F.linear(h, weight, bias).float()
    with torch.no_grad():
        r = F.linear(ref_h, ref_weight, ref_bias).float()
        log_p = torch.log_softmax(r, dim=-1)
        p = log_p.exp()
    log_q = torch.log_softmax(z, dim=-1)

    valid = labels != IGNORE_INDEX
    kl_rows = valid & ~token_mask.bool()
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    ce = -log_q.gather(1, safe_labels[:, None]).squeeze(1)
    ce = torch.where(valid, ce, torch.zeros_like(ce))

    keep = torch.ones(vocab, dtype=torch.bool, device=z.device)
    keep[_as_drop_ids(drop_ids, z.device)] = False
    terms = p * (log_p - log_q)
    kl = torch.where(keep[None, :], terms, torch.zeros_like(terms)).sum(dim=-1)
    kl = torch.where(kl_rows, kl, torch.zeros_like(kl))

    if reduction == "none":
        return alpha * ce + beta * kl
    if reduction == "sum":
        return alpha * ce.sum() + beta * kl.sum()
    n_ce = valid.sum().clamp(min=1)
    n_kl = kl_rows.sum().clamp(min=1)
    return alpha * ce.sum() / n_ce + beta * kl.sum() / n_kl


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def _triton_usable(h: torch.Tensor) -> bool:
    return triton is not None and (h.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def dual_masked_kl_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    ref_h: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    token_mask: torch.Tensor,
    drop_ids: torch.Tensor | Sequence[int] | None,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """alpha*CE + beta*DMK; fused Triton path when possible, else the reference.

    use_triton=None picks Triton when it is importable and the tensors are on CUDA (or
    TRITON_INTERPRET=1); True/False forces the choice. reduction="none" always uses the reference.
    """
    args = (h, weight, ref_h, ref_weight, labels, token_mask, drop_ids)
    kwargs = dict(alpha=alpha, beta=beta, bias=bias, ref_bias=ref_bias, reduction=reduction)
    if use_triton is None:
        use_triton = _triton_usable(h)
    if not use_triton or reduction == "none":
        return dual_masked_kl_ce_reference(*args, **kwargs)
    raise NotImplementedError("fused path not written yet")
