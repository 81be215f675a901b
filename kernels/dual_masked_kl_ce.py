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
``dual_masked_kl_ce`` runs chunks of rows through `kernels.chunked_head` (logit gradients computed
in forward), each chunk by the Triton row kernel (one program per row) or by plain torch; the row
functions also serve `kernels.linear_kl_ce` (no masks, per-token outputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels import chunked_head as ch
from kernels.triton_utils import interpreter_ready, jit_once, tl, triton

__all__ = ["dual_masked_kl_ce", "dual_masked_kl_ce_reference", "fused_backend", "interpreter_ready"]

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
    z = F.linear(h, weight, bias)
    with torch.no_grad():
        r = F.linear(ref_h, ref_weight, ref_bias)
    return dual_masked_kl_ce_from_logits(
        z, r, labels, token_mask, drop_ids, alpha=alpha, beta=beta, reduction=reduction
    )


def dual_masked_kl_ce_from_logits(
    z: torch.Tensor,
    r: torch.Tensor,
    labels: torch.Tensor,
    token_mask: torch.Tensor,
    drop_ids: torch.Tensor | Sequence[int] | None,
    alpha: float = 1.0,
    beta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The same loss from already materialised logits z (trained) and r (reference), [N, V].

    This is the eager path of a model that computes its own logits; the reference above and
    the tests build on it, so there is one definition of the semantics.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if z.shape != r.shape or z.dim() != 2:
        raise ValueError(
            f"z and r must be [N, V] of one shape, got {tuple(z.shape)}, {tuple(r.shape)}"
        )
    vocab = z.shape[1]
    z = z.float()
    with torch.no_grad():
        log_p = torch.log_softmax(r.float(), dim=-1)
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
# Chunk rows (shared with `kernels.linear_kl_ce`): torch and Triton
# --------------------------------------------------------------------------------------------

_MAX_BLOCK_V = 4096  # vocabulary tile of the row kernel (tests lower it to get several tiles)


def _dmk_ce_row_kernel(
    z_ptr,  # [rows, V] fp32 trained logits; overwritten with d loss / d z when WRITE_GRAD
    r_ptr,  # [rows, V] fp32 reference logits
    z_stride,
    r_stride,
    labels_ptr,  # [rows] int64
    kl_row_ptr,  # [rows] int8: 1 where the row enters the KL (valid and not token-masked)
    drop_ptr,  # [V] int8: 1 for vocabulary ids dropped from the KL
    ce_ptr,  # [rows] fp32 out: per-row CE (0 on ignored rows)
    kl_ptr,  # [rows] fp32 out: per-row masked KL (0 off the KL rows)
    scale_ptr,  # [rows, 2] fp32: gradient weights of the row's CE and KL (read when WRITE_GRAD)
    ref_shift,  # fp32: subtracted from r[label] of each valid row (UNDIAL's adjusted teacher)
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    r_row = r_ptr + row * r_stride
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    do_kl = tl.load(kl_row_ptr + row) != 0
    z_label = tl.load(z_row + tl.where(valid, label, 0))

    # Pass 1: online softmax statistics of z and r, plus the masked KL sums (rescaled by max).
    m_z = float("-inf")
    s_z = 0.0
    m_r = float("-inf")
    s_r = 0.0
    kept_r = 0.0  # sum over kept v of exp(r_v - m_r)
    acc = 0.0  # sum over kept v of exp(r_v - m_r) * (r_v - z_v)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=0.0)
        r = tl.load(r_row + offs, mask=inb, other=0.0)
        r = tl.where(valid & (offs == label), r - ref_shift, r)
        keep = tl.load(drop_ptr + offs, mask=inb, other=1) == 0  # False past V
        z_inf = tl.where(inb, z, float("-inf"))  # padding lanes add exp(-inf) = 0
        r_inf = tl.where(inb, r, float("-inf"))
        new_m_z = tl.maximum(m_z, tl.max(z_inf, 0))
        s_z = s_z * tl.exp(m_z - new_m_z) + tl.sum(tl.exp(z_inf - new_m_z), 0)
        m_z = new_m_z
        new_m_r = tl.maximum(m_r, tl.max(r_inf, 0))
        rescale = tl.exp(m_r - new_m_r)
        e_r = tl.exp(r_inf - new_m_r)
        s_r = s_r * rescale + tl.sum(e_r, 0)
        kept_r = kept_r * rescale + tl.sum(tl.where(keep, e_r, 0.0), 0)
        acc = acc * rescale + tl.sum(tl.where(keep, e_r * (r - z), 0.0), 0)
        m_r = new_m_r

    lse_z = m_z + tl.log(s_z)
    lse_r = m_r + tl.log(s_r)
    kept_mass = kept_r / s_r  # S = sum over kept v of p_v
    ce = tl.where(valid, lse_z - z_label, 0.0)
    kl = tl.where(do_kl, acc / s_r + kept_mass * (lse_z - lse_r), 0.0)
    tl.store(ce_ptr + row, ce)
    tl.store(kl_ptr + row, kl)

    if WRITE_GRAD:  # Pass 2: dz = a (q - onehot(label)) + b (q S - p [v kept]), written over z.
        a = tl.where(valid, tl.load(scale_ptr + 2 * row), 0.0)
        b = tl.where(do_kl, tl.load(scale_ptr + 2 * row + 1), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            z = tl.load(z_row + offs, mask=inb, other=0.0)
            r = tl.load(r_row + offs, mask=inb, other=0.0)
            r = tl.where(valid & (offs == label), r - ref_shift, r)
            keep = tl.load(drop_ptr + offs, mask=inb, other=1) == 0
            q = tl.exp(z - lse_z)
            p = tl.where(keep, tl.exp(r - lse_r), 0.0)
            onehot = tl.where(offs == label, 1.0, 0.0)
            dz = a * (q - onehot) + b * (q * kept_mass - p)
            tl.store(z_row + offs, dz, mask=inb)


def _row_kernel():
    """The jitted row kernel, decorated at first use (once per compiled/interpreted mode)."""
    return jit_once(_dmk_ce_row_kernel)


def _triton_rows(drop: torch.Tensor, ref_shift: float) -> ch.RowFn:
    def rows_fn(z, r, rows, coefs):
        labels, kl_rows = rows
        c, vocab = z.shape
        out = torch.empty(2, c, dtype=torch.float32, device=z.device)
        scales = out if coefs is None else coefs.contiguous()  # unread without WRITE_GRAD
        _row_kernel()[(c,)](
            z, r, z.stride(0), r.stride(0), labels.contiguous(), kl_rows.contiguous(), drop,
            out[0], out[1], scales, float(ref_shift), vocab, IGNORE_INDEX,
            BLOCK_V=min(triton.next_power_of_2(vocab), _MAX_BLOCK_V), WRITE_GRAD=coefs is not None,
        )  # fmt: skip
        return out.t(), z

    return rows_fn


def _torch_rows(drop: torch.Tensor, ref_shift: float) -> ch.RowFn:
    keep = drop == 0

    def rows_fn(z, r, rows, coefs):
        labels, kl_rows = rows
        valid = labels != IGNORE_INDEX
        do_kl = kl_rows != 0
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        lse_z = torch.logsumexp(z, dim=1, keepdim=True)
        ce = lse_z.squeeze(1) - z.gather(1, safe[:, None]).squeeze(1)
        log_q = z.sub_(lse_z)  # in place: z is ours and dies with the chunk
        if ref_shift:  # r is ours too
            r.scatter_add_(1, safe[:, None], (-ref_shift * valid.float())[:, None])
        log_p = r.sub_(torch.logsumexp(r, dim=1, keepdim=True))
        p = log_p.exp().mul_(keep)  # dropped ids zeroed in p, and so in every KL term
        kl = (p * (log_p - log_q)).sum(dim=1)
        zero = torch.zeros_like(ce)
        stats = torch.stack([torch.where(valid, ce, zero), torch.where(do_kl, kl, zero)], dim=1)
        if coefs is not None:  # dz = a (q - onehot) + b (q S - p), S = sum of kept p
            a = torch.where(valid, coefs[:, 0], zero)[:, None]
            b = torch.where(do_kl, coefs[:, 1], zero)[:, None]
            kept = p.sum(dim=1, keepdim=True)
            dz = log_q.exp_().mul_(a + b * kept).sub_(p.mul_(b))
            return stats, dz.scatter_add_(1, safe[:, None], -a)
        return stats, None

    return rows_fn


def kl_ce_op(
    backend: str,
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    kl_rows: torch.Tensor,
    drop_ids: torch.Tensor | Sequence[int] | None,
    vocab: int,
    chunk_size: int | None,
    ref_shift: float = 0.0,
) -> ch.HeadOp:
    """The chunked op whose stats are (CE, masked KL) per row and whose coefs are (a, b).
    `ref_shift` lowers the reference's logit of each valid row's label before its softmax."""
    dev = labels.device
    drop = torch.zeros(vocab, dtype=torch.int8, device=dev)
    drop[_as_drop_ids(drop_ids, dev)] = 1
    rows_fn = (_triton_rows if backend == "triton" else _torch_rows)(drop, ref_shift)
    rows = (labels.to(torch.long).contiguous(), kl_rows.to(torch.int8).contiguous())
    return ch.HeadOp(rows_fn, 2, 2, rows, ref=ref, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def fused_backend(h: torch.Tensor) -> str:
    """Which implementation `dual_masked_kl_ce()` runs for inputs like `h` by default:
    "triton" (compiled on CUDA, interpreted on CPU) or "torch" (the chunked torch path)."""
    return ch.resolve_backend(h, None)


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
    backend: str | None = None,
) -> torch.Tensor:
    """alpha*CE + beta*DMK, chunk by chunk over rows (`kernels.chunked_head`).

    backend: "triton" (row kernel: compiled on CUDA, or on CPU when TRITON_INTERPRET=1 was set
    before triton was imported, see ``interpreter_ready``), "torch" (the same chunks in plain
    torch: CPU, GPUs without Triton) or "eager" (the full-logits reference). None picks Triton
    where it runs, else torch; `use_triton` True/False is the older spelling of triton/torch.

    "mean"/"sum" compute the gradients in forward (the per-row weights alpha/n_ce, beta/n_kl are
    known); "none" returns per-row losses whose backward re-makes the logits.
    chunk_size: rows per chunk (default keeps each fp32 [chunk, V] buffer near 64 MiB); peak
    extra memory is a few such buffers plus fp32 grad_weight/grad_bias.
    """
    if backend is None and use_triton is not None:
        backend = "triton" if use_triton else "torch"
    backend = ch.resolve_backend(h, backend)
    args = (h, weight, ref_h, ref_weight, labels, token_mask, drop_ids)
    kwargs = dict(alpha=alpha, beta=beta, bias=bias, ref_bias=ref_bias, reduction=reduction)
    if backend == "eager":
        return dual_masked_kl_ce_reference(*args, **kwargs)
    _check(h, weight, ref_h, ref_weight, labels, token_mask, reduction)
    dev = h.device
    labels = labels.to(device=dev, dtype=torch.long)
    valid = labels != IGNORE_INDEX
    kl_rows = valid & ~token_mask.to(device=dev, dtype=torch.bool)
    ref = (ref_h, ref_weight, ref_bias)
    op = kl_ce_op(backend, ref, labels, kl_rows, drop_ids, weight.shape[0], chunk_size)
    if reduction == "none":
        diff, _ = ch.per_row(op, h, weight, bias)
        return alpha * diff[:, 0] + beta * diff[:, 1]
    coefs = torch.tensor([[alpha, beta]], dtype=torch.float32, device=dev).expand(len(labels), 2)
    if reduction == "mean":  # a row's share of each mean: alpha / n_ce, beta / n_kl
        counts = torch.stack([valid.sum(), kl_rows.sum()]).clamp(min=1)
        coefs = coefs / counts
    return ch.weighted(op, h, weight, bias, coefs)[0]
