"""Per-token log-probability of the labels with the `lm_head` matmul fused (CE = -log p).

Per row i, with z = h_i W^T + b over the FULL vocabulary:

    lse_i = logsumexp(z),  lp_i = z[labels_i] - lse_i     (0 where labels_i == -100)
    moments (scoring only, for Min-K%++): with m the top logit and d = z - m,
    mu_i = (m - lse) + E_p[d],  sigma_i = sqrt(E_p[(d - E_p[d])^2])    (as `eval.mia`)

``linear_logprob`` returns lp per token (differentiable: backward re-makes the logits) or, given
per-token `weights`, the scalar sum_i weights_i * lp_i with the gradients taken in the forward
pass (`kernels.chunked_head` says when each is right). ``linear_logprob_stats`` gives lp, lse and
optionally the moments without a graph. Three backends: "triton" (a row kernel, one program per
row), "torch" (the same chunks in plain torch: CPU and GPUs without Triton) and "eager"
(``linear_logprob_reference``: full [N, V] logits, the ground truth).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import chunked_head as ch
from kernels.triton_utils import jit_once, tl, triton

IGNORE_INDEX = ch.IGNORE_INDEX
_MAX_BLOCK_V = 4096  # vocabulary tile of the row kernel (tests lower it to get several tiles)


class TokenStats(NamedTuple):
    """Per row [N] fp32: log p(label) (0 on ignored rows), logsumexp of the logits, and with
    moments the mean and standard deviation of log p under p itself (else None)."""

    logprob: torch.Tensor
    lse: torch.Tensor
    mu: torch.Tensor | None = None
    sigma: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def logprob_from_logits(z: torch.Tensor, labels: torch.Tensor, moments: bool = False) -> TokenStats:
    """The statistics of already materialised logits z [N, V] (upcast to fp32)."""
    lp_all = torch.log_softmax(z.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = lp_all.gather(1, safe[:, None]).squeeze(1)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    lse = torch.logsumexp(z.float(), dim=-1)
    if not moments:
        return TokenStats(lp, lse)
    top = lp_all.max(dim=-1, keepdim=True).values
    d = lp_all - top
    p = lp_all.exp()
    live = p > 0  # 0 * (-inf) would be nan
    zero = torch.zeros_like(d)
    m1 = torch.where(live, p * d, zero).sum(dim=-1, keepdim=True)
    var = torch.where(live, p * (d - m1).square(), zero).sum(dim=-1)
    return TokenStats(lp, lse, (top + m1).squeeze(-1), var.sqrt())


def linear_logprob_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    moments: bool = False,
) -> TokenStats:
    """Plain torch over full [N, V] logits (autograd flows into `logprob`)."""
    return logprob_from_logits(F.linear(h, weight, bias), labels, moments)


# --------------------------------------------------------------------------------------------
# Chunk rows: torch and Triton
# --------------------------------------------------------------------------------------------


def _torch_rows(moments: bool) -> ch.RowFn:
    def rows_fn(z, _r, rows, coefs):
        (labels,) = rows
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        # one fused log_softmax (the fastest full-row pass torch has); lse = z - log p anywhere
        log_p = torch.log_softmax(z, dim=1)
        lse = z[:, 0] - log_p[:, 0]
        del z  # the caller's buffer: freed with the chunk, dz goes into log_p's
        lp = log_p.gather(1, safe[:, None]).squeeze(1)
        cols = [torch.where(valid, lp, torch.zeros_like(lp)), lse]
        if moments:  # as the reference: centred on the top log-probability
            top = log_p.max(dim=1, keepdim=True).values
            p = log_p.exp()
            d = log_p - top
            live = p > 0
            zero = torch.zeros_like(d)
            m1 = torch.where(live, p * d, zero).sum(dim=1, keepdim=True)
            var = torch.where(live, p * (d - m1).square(), zero).sum(dim=1)
            cols += [(top + m1).squeeze(1), var.sqrt()]
        stats = torch.stack(cols, dim=1)
        if coefs is None:
            return stats, None
        c = torch.where(valid, coefs[:, 0], torch.zeros_like(coefs[:, 0]))[:, None]
        dz = log_p.exp_().mul_(-c)  # d(c lp)/dz = c (onehot - softmax)
        return stats, dz.scatter_add_(1, safe[:, None], c)

    return rows_fn


def _logprob_row_kernel(
    z_ptr,  # [rows, V] fp32 logits; overwritten with d(c lp)/dz when WRITE_GRAD
    z_stride,
    labels_ptr,  # [rows] int64
    out_ptr,  # [rows, n_stats] fp32 out: lp, lse (, mu, sigma)
    n_stats,
    coef_ptr,  # [rows] fp32: c, the weight of the row's lp (read when WRITE_GRAD)
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    MOMENTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    z_label = tl.load(z_row + tl.where(valid, label, 0))

    # Pass 1: online max and sum of exp.
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
        new_m = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), 0)
        m = new_m
    lse = m + tl.log(s)
    out_row = out_ptr + row * n_stats
    tl.store(out_row, tl.where(valid, z_label - lse, 0.0))
    tl.store(out_row + 1, lse)

    if MOMENTS:  # centred on the top logit, as eval.mia: E_p[d], then E_p[(d - E_p[d])^2]
        m1 = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0)
            p = tl.where(inb, tl.exp(z - lse), 0.0)  # padding lanes: p = 0 and d = 0, no nan
            m1 += tl.sum(tl.where(p > 0, p * (z - m), 0.0), 0)
        var = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0)
            p = tl.where(inb, tl.exp(z - lse), 0.0)
            dev = z - m - m1
            var += tl.sum(tl.where(p > 0, p * dev * dev, 0.0), 0)
        tl.store(out_row + 2, m - lse + m1)
        tl.store(out_row + 3, tl.sqrt(var))

    if WRITE_GRAD:  # c (onehot - q) over z
        c = tl.where(valid, tl.load(coef_ptr + row), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0)
            q = tl.exp(z - lse)
            onehot = tl.where(offs == label, 1.0, 0.0)
            tl.store(z_row + offs, c * (onehot - q), mask=inb)


def _triton_rows(moments: bool) -> ch.RowFn:
    n_stats = 4 if moments else 2

    def rows_fn(z, _r, rows, coefs):
        (labels,) = rows
        c, vocab = z.shape
        out = torch.empty(c, n_stats, dtype=torch.float32, device=z.device)
        coef = out if coefs is None else coefs[:, 0].contiguous()  # unread without WRITE_GRAD
        jit_once(_logprob_row_kernel)[(c,)](
            z, z.stride(0), labels.contiguous(), out, n_stats, coef, vocab, IGNORE_INDEX,
            BLOCK_V=min(triton.next_power_of_2(vocab), _MAX_BLOCK_V),
            MOMENTS=moments, WRITE_GRAD=coefs is not None,
        )  # fmt: skip
        return out, z

    return rows_fn


def _op(backend: str, labels: torch.Tensor, moments: bool, chunk_size: int | None) -> ch.HeadOp:
    rows = (_triton_rows if backend == "triton" else _torch_rows)(moments)
    labels = labels.to(dtype=torch.long).contiguous()
    return ch.HeadOp(rows, 4 if moments else 2, 1, (labels,), chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def linear_logprob(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """log p(labels_i | h_i) per row [N] fp32 (0 where labels_i == -100), or with `weights` [N]
    the scalar sum_i weights_i * log p_i (gradients computed in the forward: the cheap mode for
    a loss linear in the token log-probs). Gradients reach h, weight and bias.

    backend: None picks "triton" where it runs, else "torch"; "eager" is the reference.
    chunk_size: rows per chunk (default: about 64 MiB of fp32 logits).
    """
    ch.check_rows(h, weight, labels)
    backend = ch.resolve_backend(h, backend)
    if backend == "eager":
        lp = linear_logprob_reference(h, weight, labels.to(h.device), bias).logprob
        return lp if weights is None else (weights.to(lp) * lp).sum()
    op = _op(backend, labels.to(h.device), False, chunk_size)
    if weights is None:
        return ch.per_row(op, h, weight, bias)[0][:, 0]
    return ch.weighted(op, h, weight, bias, weights.reshape(-1, 1))[0]


@torch.no_grad()
def linear_logprob_stats(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    moments: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> TokenStats:
    """`TokenStats` per row, without a graph (scoring)."""
    ch.check_rows(h, weight, labels)
    backend = ch.resolve_backend(h, backend)
    if backend == "eager":
        return linear_logprob_reference(h, weight, labels.to(h.device), bias, moments)
    op = _op(backend, labels.to(h.device), moments, chunk_size)
    lp, rest = ch.per_row(op, h, weight, bias)
    return TokenStats(lp[:, 0], *rest.unbind(1))
