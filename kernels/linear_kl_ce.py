"""Per-token KL(p_ref || q) and CE of the labels, with both models' `lm_head` matmuls fused.

Per row i, with z = h_i W^T + b (trained model, q = softmax(z)) and r = ref_h_i Wr^T + br (frozen
reference, p = softmax(r)), both over the FULL vocabulary:

    ce_i = -log q[labels_i],   kl_i = sum_v p_v (log p_v - log q_v)    (both 0 where labels_i == -100)

Both come from one sweep over the logits, so a loss that needs both (KL_Min's retain step) makes
each chunk's logits once. With `ref_shift` = g the reference is UNDIAL's adjusted teacher,
p = softmax(r - g * onehot(labels_i)): its own prediction with the label's logit lowered. The row math is the Dual Masked KL's (`kernels.dual_masked_kl_ce`) with
no token mask and no vocabulary mask; chunking and the two backward modes are
`kernels.chunked_head`'s. Gradients reach h, weight and bias; the reference side gets none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import chunked_head as ch
from kernels.dual_masked_kl_ce import kl_ce_op

IGNORE_INDEX = ch.IGNORE_INDEX


def kl_ce_from_logits(
    z: torch.Tensor, r: torch.Tensor, labels: torch.Tensor, ref_shift: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, kl) per row [N] fp32 from materialised logits z, r [N, V]: the ground truth."""
    log_q = torch.log_softmax(z.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    with torch.no_grad():
        r = r.float().clone()
        r[valid, safe[valid]] -= ref_shift
        log_p = torch.log_softmax(r, dim=-1)
    ce = -log_q.gather(1, safe[:, None]).squeeze(1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    zero = torch.zeros_like(ce)
    return torch.where(valid, ce, zero), torch.where(valid, kl, zero)


def linear_kl_ce_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    ref_h: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_shift: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch over full [N, V] logits of both models."""
    with torch.no_grad():
        r = F.linear(ref_h, ref_weight, ref_bias)
    return kl_ce_from_logits(F.linear(h, weight, bias), r, labels, ref_shift)


def linear_kl_ce(
    h: torch.Tensor,
    weight: torch.Tensor,
    ref_h: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    ref_shift: float = 0.0,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """(ce [N], kl [N]) per row, or with `weights` [N, 2] the scalar
    sum_i weights[i, 0] * ce_i + weights[i, 1] * kl_i (gradients computed in the forward).

    backend: None picks "triton" where it runs, else "torch"; "eager" is the reference.
    """
    ch.check_rows(h, weight, labels, ref_h)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError("weight and ref_weight must share the vocabulary size V")
    backend = ch.resolve_backend(h, backend)
    labels = labels.to(device=h.device, dtype=torch.long)
    if backend == "eager":
        ce, kl = linear_kl_ce_reference(
            h, weight, ref_h, ref_weight, labels, bias, ref_bias, ref_shift
        )
        if weights is None:
            return ce, kl
        w = weights.to(ce)
        return (w[:, 0] * ce + w[:, 1] * kl).sum()
    ref = (ref_h, ref_weight, ref_bias)
    valid = labels != IGNORE_INDEX
    op = kl_ce_op(backend, ref, labels, valid, None, weight.shape[0], chunk_size, ref_shift)
    if weights is None:
        diff, _ = ch.per_row(op, h, weight, bias)
        return diff[:, 0], diff[:, 1]
    return ch.weighted(op, h, weight, bias, weights)[0]
