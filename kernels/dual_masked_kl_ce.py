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

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.triton_utils import interpreter_ready, jit_once, tl, triton

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
# Fused Triton path
# --------------------------------------------------------------------------------------------

_MAX_BLOCK_V = 4096  # vocabulary tile of the row kernel (tests lower it to get several tiles)
_CHUNK_ELEMS = 2**24  # rows per chunk ~ this many fp32 logits per buffer (64 MiB), two buffers


def _dmk_ce_row_kernel(
    z_ptr,  # [rows, V] fp32 trained logits; overwritten with d loss / d z
    r_ptr,  # [rows, V] fp32 reference logits
    z_stride,
    r_stride,
    labels_ptr,  # [rows] int64
    kl_row_ptr,  # [rows] int8: 1 where the row enters the KL (valid and not token-masked)
    drop_ptr,  # [V] int8: 1 for vocabulary ids dropped from the KL
    ce_ptr,  # [rows] fp32 out: per-row CE (0 on ignored rows)
    kl_ptr,  # [rows] fp32 out: per-row masked KL (0 off the KL rows)
    scale_ptr,  # [2] fp32: gradient weights of a CE row and of a KL row
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
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

    # Pass 2: dz = a (q - onehot(label)) + b (q S - p [v kept]), written over z.
    a = tl.where(valid, tl.load(scale_ptr), 0.0)
    b = tl.where(do_kl, tl.load(scale_ptr + 1), 0.0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(z_row + offs, mask=inb, other=0.0)
        r = tl.load(r_row + offs, mask=inb, other=0.0)
        keep = tl.load(drop_ptr + offs, mask=inb, other=1) == 0
        q = tl.exp(z - lse_z)
        p = tl.where(keep, tl.exp(r - lse_r), 0.0)
        onehot = tl.where(offs == label, 1.0, 0.0)
        dz = a * (q - onehot) + b * (q * kept_mass - p)
        tl.store(z_row + offs, dz, mask=inb)


def _row_kernel():
    """The jitted row kernel, decorated at first use (once per compiled/interpreted mode)."""
    return jit_once(_dmk_ce_row_kernel)


def _default_chunk(n: int, vocab: int) -> int:
    return max(1, min(n, _CHUNK_ELEMS // max(1, vocab)))


class _DualMaskedKLCEFunction(torch.autograd.Function):
    """Chunked forward that also computes d loss / d (h, weight, bias); backward only rescales.

    Only reduction "mean" and "sum" (a scalar loss, so the gradients can be computed before the
    incoming grad is known); the dispatcher sends "none" to the reference.
    """

    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        bias,
        ref_h,
        ref_weight,
        ref_bias,
        labels,
        token_mask,
        drop_ids,
        alpha,
        beta,
        reduction,
        chunk_size,
    ):
        n, hid = h.shape
        vocab = weight.shape[0]
        dev = h.device
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]

        labels = labels.to(device=dev, dtype=torch.long).contiguous()
        valid = labels != IGNORE_INDEX
        kl_rows = valid & ~token_mask.to(device=dev, dtype=torch.bool)
        kl_rows_i8 = kl_rows.to(torch.int8).contiguous()
        drop = torch.zeros(vocab, dtype=torch.int8, device=dev)
        drop[_as_drop_ids(drop_ids, dev)] = 1
        n_ce = valid.sum().clamp(min=1).float()
        n_kl = kl_rows.sum().clamp(min=1).float()
        if reduction == "mean":
            scales = torch.stack([alpha / n_ce, beta / n_kl]).float()
        else:
            scales = torch.tensor([alpha, beta], dtype=torch.float32, device=dev)

        ce = torch.empty(n, dtype=torch.float32, device=dev)
        kl = torch.empty(n, dtype=torch.float32, device=dev)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(vocab, hid, dtype=torch.float32, device=dev) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None

        chunk = int(chunk_size) if chunk_size else _default_chunk(n, vocab)
        block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
        kernel = _row_kernel()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            h_c = h[s:e]
            z = F.linear(h_c, weight, bias).float().contiguous()
            r = F.linear(ref_h[s:e], ref_weight, ref_bias).float().contiguous()
            kernel[(e - s,)](
                z,
                r,
                z.stride(0),
                r.stride(0),
                labels[s:e],
                kl_rows_i8[s:e],
                drop,
                ce[s:e],
                kl[s:e],
                scales,
                vocab,
                IGNORE_INDEX,
                BLOCK_V=block_v,
            )
            del r
            # z now holds d loss / d z (fp32). grad_h rows are written once, so one matmul in the
            # input dtype suffices; grad_weight sums partials over chunks, which cancel: bf16
            # partials lose too much there, so that matmul runs in fp32.
            if need_h:
                grad_h[s:e] = z.to(weight.dtype) @ weight
            if need_w:
                grad_w.addmm_(z.t(), h_c.float())
            if need_b:
                grad_b += z.sum(0)

        if reduction == "mean":
            loss = alpha * ce.sum() / n_ce + beta * kl.sum() / n_kl
        else:
            loss = alpha * ce.sum() + beta * kl.sum()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dt, w_dt, b_dt = ctx.dtypes
        g = grad_out.float()
        out_h = None if grad_h is None else (grad_h.float() * g).to(h_dt)
        out_w = None if grad_w is None else (grad_w * g).to(w_dt)
        out_b = None if grad_b is None else (grad_b * g).to(b_dt)
        return (out_h, out_w, out_b) + (None,) * 10


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------


def _triton_usable(h: torch.Tensor) -> bool:
    if h.is_cuda:
        return triton is not None
    return interpreter_ready()


def fused_backend(h: torch.Tensor) -> str:
    """Which implementation `dual_masked_kl_ce(use_triton=None)` runs for inputs like `h`:
    "triton" (compiled on CUDA, interpreted on CPU) or "torch" (the reference)."""
    return "triton" if _triton_usable(h) else "torch"


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

    use_triton=None picks Triton when it is importable and the tensors are on CUDA, or when
    TRITON_INTERPRET=1 was set before triton was imported (CPU interpreter; see
    ``interpreter_ready``); True/False forces the choice.

    reduction="none" always uses the reference: the fused path computes the gradients in forward,
    which needs the scalar incoming grad of "mean"/"sum" to be applied afterwards.
    chunk_size: rows per chunk of the fused path (default keeps each fp32 [chunk, V] buffer
    near 64 MiB); peak extra memory is two such buffers plus fp32 grad_weight/grad_bias.
    """
    args = (h, weight, ref_h, ref_weight, labels, token_mask, drop_ids)
    kwargs = dict(alpha=alpha, beta=beta, bias=bias, ref_bias=ref_bias, reduction=reduction)
    if use_triton is None:
        use_triton = _triton_usable(h)
    if not use_triton or reduction == "none":
        return dual_masked_kl_ce_reference(*args, **kwargs)
    if triton is None:
        raise RuntimeError("use_triton=True but triton is not importable")
    _check(h, weight, ref_h, ref_weight, labels, token_mask, reduction)
    with torch.no_grad():  # the reference model is frozen: detach its side up front
        ref_h, ref_weight = ref_h.detach(), ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    return _DualMaskedKLCEFunction.apply(
        h, weight, bias, ref_h, ref_weight, ref_bias, labels, token_mask, drop_ids,
        float(alpha), float(beta), reduction, chunk_size,
    )  # fmt: skip
