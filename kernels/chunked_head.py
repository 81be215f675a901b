"""The loop every fused `lm_head` + per-token loss op shares: logits made chunk by chunk over rows.

An op maps h [N, H] to z = h W^T + b [N, V] (and, for ops against a frozen reference model,
r = ref_h Wr^T + br) and on to a few per-row statistics (log p of the label, a KL, ...). The [N, V]
logits are never built for all rows at once: rows go in chunks of about `CHUNK_ELEMS` fp32
logits (64 MiB on a GPU; 256 MiB on CPU, where each chunk's rank-c update of dW costs a full
pass over V x H of memory traffic, so fewer chunks pay); each chunk's logits are made, handed to
the op's row function (a Triton kernel or plain torch: the backends differ only there) and
dropped. Peak extra memory is a few [chunk, V] fp32
buffers plus the gradients themselves.

Outputs are per token, and what the loss does with them may be nonlinear (NPO takes a logsigmoid
of per-sequence sums), so the backward's grad_output is in general unknown at forward time. Two
modes, picked by the caller:

* ``weighted`` (`coefs` [N, k] known at forward time; the loss is sum_i,j coefs[i, j] *
  stat_j[i]): the row function writes dL/dz over the chunk's logits in the forward pass and the
  chunk's share of dL/dh, dL/dW and dL/db is taken right there; backward only scales them by the
  incoming scalar. Three matmuls per chunk (logits, dh, dW), as many as eager autograd, and no
  saved activations. Every loss linear in the per-token values uses it (per-example CE and KL
  means: GA, GradDiff, KL_Min, MMUnlearner, SIU, the saliency pass).
* ``per_row`` (no coefs): forward returns the statistics and saves only its inputs; backward
  re-makes each chunk's logits and applies the incoming per-row grads. One matmul more (four),
  but the only choice short of storing [N, V]: dL/dW = sum_i g_i dz_i^T h_i needs the g_i, which
  exist only once the graph above has run. NPO uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.triton_utils import interpreter_ready, triton

IGNORE_INDEX = -100
BACKENDS = ("triton", "torch", "eager")
CHUNK_ELEMS = 2**24  # fp32 logits per chunk buffer on a GPU (64 MiB)
CPU_CHUNK_ELEMS = 2**26  # and on CPU (256 MiB)

RowFn = Callable[
    [torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...], torch.Tensor | None],
    torch.Tensor,
]
"""(z [c, V] fp32 contiguous, r [c, V] fp32 or None, the per-row tensors cut to the chunk, coefs
[c, k] fp32 or None) -> (stats [c, n_stats] fp32 whose first k columns are differentiable,
dz = d(sum coefs * stats[:, :k]) / dz [c, V] fp32 with coefs, else None). z and r are the
function's to overwrite (dz may be z itself)."""


def resolve_backend(h: torch.Tensor, backend: str | None) -> str:
    """None -> "triton" where it runs (CUDA with triton importable, or CPU under the interpreter:
    see `interpreter_ready`), else "torch" (the chunked torch path); an explicit name is checked."""
    if backend is None:
        usable = triton is not None if h.is_cuda else interpreter_ready()
        return "triton" if usable else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("backend 'triton' but triton is not importable")
    return backend


def default_chunk(n: int, vocab: int, device: torch.device) -> int:
    elems = CPU_CHUNK_ELEMS if device.type == "cpu" else CHUNK_ELEMS
    return max(1, min(n, elems // max(1, vocab)))


@dataclass
class HeadOp:
    """One op: its row function, how many statistics it returns (the first `n_grad` of them
    differentiable), the per-row inputs it reads and, if it has one, the frozen reference side."""

    row_fn: RowFn
    n_stats: int
    n_grad: int
    rows: tuple[torch.Tensor, ...]
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    chunk_size: int | None = None


def _sweep(
    op: HeadOp,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    coefs: torch.Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(stats [N, n_stats], dh, dW, db): the chunk loop. The gradients are those of
    sum(coefs * stats[:, :n_grad]) and only computed with coefs (None where `need` says no)."""
    n, hid = h.shape
    vocab = weight.shape[0]
    dev = h.device
    with_grad = coefs is not None
    need_h, need_w, need_b = (with_grad and x for x in need)
    need_b = need_b and bias is not None
    stats = torch.empty(n, op.n_stats, dtype=torch.float32, device=dev)
    grad_h = torch.empty_like(h) if need_h else None
    # dW is accumulated in the weight's dtype, the dtype it is returned in: an fp32 accumulator
    # for a bf16 head is V x H x 4 bytes more (2.0 GiB at Qwen2-VL-7B's) and its updates run at
    # fp32 GEMM speed. Each chunk's update is summed in fp32 inside the GEMM; bf16 rounds once
    # per chunk (test_bf16_weight_gradient_error_stays_near_eager bounds the error).
    grad_w = torch.zeros(vocab, hid, dtype=weight.dtype, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    chunk = int(op.chunk_size) if op.chunk_size else default_chunk(n, vocab, dev)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        h_c = h[s:e]
        z = F.linear(h_c, weight, bias).float().contiguous()
        r = None
        if op.ref is not None:
            ref_h, ref_w, ref_b = op.ref
            r = F.linear(ref_h[s:e], ref_w, ref_b).float().contiguous()
        rows = tuple(x[s:e] for x in op.rows)
        stats[s:e], dz = op.row_fn(z, r, rows, coefs[s:e] if with_grad else None)
        del z, r
        if need_h or need_w:  # the GEMMs run in the weight's dtype, as eager autograd's do
            dz_w = dz.to(weight.dtype)
        if need_h:
            grad_h[s:e] = dz_w @ weight
        if need_w:
            grad_w.addmm_(dz_w.t(), h_c.to(weight.dtype))
        if need_b:
            grad_b += dz.sum(0)
    return stats, grad_h, grad_w, grad_b


def _cast(g: torch.Tensor | None, dtype, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """g (times `scale`) in `dtype`, in place where the dtype already matches (dW is V x H: no
    second copy of it)."""
    if g is None:
        return None
    if scale is not None:
        g = g.mul_(scale.to(g.dtype))
    return g.to(dtype)


class _Weighted(torch.autograd.Function):
    """loss = sum(coefs * stats[:, :n_grad]), gradients computed in forward (see module doc)."""

    @staticmethod
    def forward(ctx, h, weight, bias, coefs, op):
        need = tuple(ctx.needs_input_grad[:3])
        stats, gh, gw, gb = _sweep(op, h, weight, bias, coefs, need)
        loss = (coefs * stats[:, : op.n_grad]).sum()
        ctx.grads = (gh, gw, gb)  # not inputs or outputs: kept off save_for_backward
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.grads is None:
            raise RuntimeError("the fused head loss was already backpropagated once")
        grads, ctx.grads = ctx.grads, None  # scaled in place: free them with the graph
        g = grad_loss.float()
        out = tuple(_cast(x, dt, g) for x, dt in zip(grads, ctx.dtypes, strict=True))
        return (*out, None, None)


class _PerRow(torch.autograd.Function):
    """(stats[:, :n_grad], stats[:, n_grad:]); backward re-makes the logits (see module doc)."""

    @staticmethod
    def forward(ctx, h, weight, bias, op):
        stats, *_ = _sweep(op, h, weight, bias, None, (False, False, False))
        ctx.save_for_backward(h, weight, bias)
        ctx.op = op
        rest = stats[:, op.n_grad :].clone()
        ctx.mark_non_differentiable(rest)
        return stats[:, : op.n_grad].clone(), rest

    @staticmethod
    def backward(ctx, grad_stats, _grad_rest):
        h, weight, bias = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        coefs = grad_stats.float().contiguous()
        _, gh, gw, gb = _sweep(ctx.op, h, weight, bias, coefs, need)
        dts = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (*(_cast(x, dt) for x, dt in zip((gh, gw, gb), dts, strict=True)), None)


def _frozen(op: HeadOp) -> HeadOp:
    if op.ref is not None:  # the reference model is frozen: detach its side up front
        op.ref = tuple(None if t is None else t.detach() for t in op.ref)
    return op


def weighted(
    op: HeadOp,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    coefs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(coefs * stats[:, :n_grad]) as a differentiable scalar, stats [N, n_stats])."""
    if coefs.shape != (h.shape[0], op.n_grad):
        raise ValueError(f"coefs must be [{h.shape[0]}, {op.n_grad}], got {tuple(coefs.shape)}")
    coefs = coefs.detach().to(device=h.device, dtype=torch.float32).contiguous()
    return _Weighted.apply(h, weight, bias, coefs, _frozen(op))


def per_row(
    op: HeadOp, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(differentiable stats [N, n_grad], the others [N, n_stats - n_grad])."""
    if not torch.is_grad_enabled():  # scoring: no graph, no saved inputs
        stats, *_ = _sweep(_frozen(op), h, weight, bias, None, (False, False, False))
        return stats[:, : op.n_grad], stats[:, op.n_grad :]
    return _PerRow.apply(h, weight, bias, _frozen(op))


def check_rows(h: torch.Tensor, weight: torch.Tensor, *per_row_inputs: torch.Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"h [N, H] and weight [V, H] expected, got {tuple(h.shape)}, {tuple(weight.shape)}"
        )
    for x in per_row_inputs:
        if x.shape[0] != h.shape[0]:
            raise ValueError(f"per-row input of {x.shape[0]} rows for {h.shape[0]} rows of h")
