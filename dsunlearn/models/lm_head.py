"""Losses and scores of answer tokens with the `lm_head` fused into them: no [B, T, V] logits.

Every method, the saliency pass and every teacher-forced score takes the decoder's final hidden
states at the answer positions (`encode.final_hidden_states`, which runs the model with
`logits_to_keep=1`) and the output head's weight and bias, and hands them to the chunked ops of
`kernels/` (`linear_logprob`, `linear_kl_ce`), which never build the logits of more than one
chunk of rows.

Under ZeRO-3 the head is gathered (`deepspeed.zero.GatheredParameters`) around the op. The
trained head stays gathered from the loss until its backward is done (`HeldHead`, released by
`Method.before_step`, i.e. after the backward and before the optimizer step): the op's weight
gradient is full-size, and ZeRO-3 reduce-scatters it into the partition only while the parameter
has its full shape, as it does in the module's own backward. The frozen reference model's head
is gathered only around its no-grad op.

`DSUNLEARN_HEAD_BACKEND` = triton | torch | eager picks the ops' backend (default: Triton where
it runs, else the chunked torch path); "eager" builds the [N, V] logits of the answer rows, for
debugging. The full-logits formulas on model logits stay as test references
(`methods.base.example_ce`, `example_kl`, `eval.mia.answer_token_logprobs`, ...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dsunlearn.models.encode import IGNORE_INDEX, final_hidden_states, hf_model
from kernels.linear_kl_ce import linear_kl_ce
from kernels.linear_logprob import TokenStats, linear_logprob, linear_logprob_stats

Batch = dict[str, torch.Tensor]
BACKEND_ENV = "DSUNLEARN_HEAD_BACKEND"


def backend() -> str | None:
    """The kernels' backend: `DSUNLEARN_HEAD_BACKEND` if set, else None (their default)."""
    return os.environ.get(BACKEND_ENV) or None


# ------------------------------------------------------------------ the head under ZeRO-3


def output_head(model: Any) -> torch.nn.Linear:
    """The model's output head (through DeepSpeed and peft wrappers); it must be a Linear."""
    hf = hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(hf).__name__} has no linear lm_head for the fused head ops")
    return head


def head_params(head: torch.nn.Linear) -> list[torch.nn.Parameter]:
    return [p for p in (head.weight, head.bias) if p is not None]


def gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Full ZeRO-3 parameters inside the block (read-only gather); a no-op for ordinary ones."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class HeldHead:
    """The trained head, kept gathered from its loss until `release` (after the backward)."""

    def __init__(self) -> None:
        self._held: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def use(self, head: torch.nn.Linear) -> Iterator[None]:
        """The head gathered inside the block; with a graph being built it stays gathered after
        it (until `release`), so that the backward sees the full weight."""
        if not torch.is_grad_enabled():
            with gathered(head_params(head)):
                yield
            return
        self.release()
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(head_params(head)))
        self._held = stack
        yield

    def release(self) -> None:
        """Re-partition the head held by the last loss (a no-op when none is held)."""
        if self._held is not None:
            self._held.close()
            self._held = None


# ------------------------------------------------------------------ answer rows


@dataclass
class AnswerRows:
    """The labelled positions of a teacher-forced batch, next-token shifted like the models:
    position t is scored on label t+1. N rows, in row-major order of the [B, T-1] grid."""

    sel: torch.Tensor  # [B, T-1] bool
    labels: torch.Tensor  # [N]
    example: torch.Tensor  # [N] the batch row of each

    @classmethod
    def of(cls, labels: torch.Tensor) -> AnswerRows:
        shifted = labels[:, 1:]
        sel = shifted != IGNORE_INDEX
        return cls(sel, shifted[sel], torch.nonzero(sel, as_tuple=True)[0])

    @property
    def batch_size(self) -> int:
        return self.sel.shape[0]

    def counts(self) -> torch.Tensor:
        """Answer tokens per example [B]."""
        return self.sel.sum(dim=1)

    def per_example_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[B] fp32: the sum of each example's rows of `values` [N]."""
        out = torch.zeros(self.batch_size, dtype=torch.float32, device=values.device)
        return out.index_add(0, self.example.to(values.device), values.float())

    def mean_weights(self) -> torch.Tensor:
        """[N]: 1 / (n_b * B) on example b's rows, so that sum(w * x) is the batch mean of the
        per-example token means of x (an example without answer tokens counts as 0)."""
        counts = self.counts().clamp(min=1).to(torch.float32)
        return (1.0 / (counts * self.batch_size))[self.example]

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """[B, T-1] fp32 with `values` [N] at the answer positions, 0 elsewhere."""
        out = torch.zeros(self.sel.shape, dtype=torch.float32, device=values.device)
        out[self.sel.to(values.device)] = values.float()
        return out


def answer_states(model: Any, batch: Batch, rows: AnswerRows) -> torch.Tensor:
    """Final hidden states [N, H] at the answer rows."""
    h = final_hidden_states(model, batch)[:, :-1]
    return h[rows.sel.to(h.device)]


# ------------------------------------------------------------------ losses (methods, saliency)


def mean_ce(model: Any, batch: Batch, held: HeldHead, scale: float = 1.0) -> torch.Tensor:
    """scale * (batch mean of each example's mean answer-token CE): `example_ce(...).mean()`
    without the logits. Gradients in the forward (weights known: `kernels.chunked_head`)."""
    rows = AnswerRows.of(batch["labels"])
    h = answer_states(model, batch, rows)
    head = output_head(model)
    weights = -scale * rows.mean_weights().to(h.device)  # CE = -log p
    with held.use(head):
        labels = rows.labels.to(h.device)
        return linear_logprob(h, head.weight, labels, head.bias, weights=weights, backend=backend())


def mean_ce_kl(
    model: Any,
    ref: Any,
    batch: Batch,
    held: HeldHead,
    ce_weight: float,
    kl_weight: float,
    ref_shift: float = 0.0,
) -> torch.Tensor:
    """Batch mean of ce_weight * CE_b + kl_weight * KL_b, each per-example token means, KL(p_ref
    || p_theta) against the frozen `ref`: `(cw * example_ce + kw * example_kl).mean()`. With
    `ref_shift` = g, p_ref is softmax(r - g * onehot(label)) (UNDIAL's teacher)."""
    rows = AnswerRows.of(batch["labels"])
    h = answer_states(model, batch, rows)
    with torch.no_grad():
        ref_h = answer_states(ref, batch, rows)
    head, ref_head = output_head(model), output_head(ref)
    w = rows.mean_weights().to(h.device)
    weights = torch.stack([ce_weight * w, kl_weight * w], dim=1)
    with held.use(head), gathered(head_params(ref_head)):
        return linear_kl_ce(
            h, head.weight, ref_h, ref_head.weight, rows.labels.to(h.device), head.bias,
            ref_head.bias, weights=weights, ref_shift=ref_shift, backend=backend(),
        )  # fmt: skip


def answer_lengths(batch: Batch) -> torch.Tensor:
    """[B] answer tokens per example (the |y| of length-normalised losses)."""
    return AnswerRows.of(batch["labels"]).counts()


def example_logprob_sums(model: Any, batch: Batch, held: HeldHead | None = None) -> torch.Tensor:
    """[B] log p(answer | prompt) per example. With a graph (and `held`) it is differentiable
    and its backward re-makes the logits (the caller's nonlinearity is unknown here)."""
    rows = AnswerRows.of(batch["labels"])
    h = answer_states(model, batch, rows)
    head = output_head(model)
    if held is None and torch.is_grad_enabled():
        raise ValueError("a differentiable use needs a HeldHead to keep the head for its backward")
    with held.use(head) if held is not None else gathered(head_params(head)):
        lp = linear_logprob(h, head.weight, rows.labels.to(h.device), head.bias, backend=backend())
    return rows.per_example_sum(lp)


# ------------------------------------------------------------------ teacher-forced scores


@dataclass
class TeacherForced:
    """A scored batch: the answer rows, their hidden states and the (gathered) head. Valid only
    inside `teacher_forced`, where the head is gathered."""

    rows: AnswerRows
    h: torch.Tensor
    head: torch.nn.Linear
    _stats: TokenStats | None = None

    def stats(self, moments: bool = False) -> TokenStats:
        """Per answer row [N]: log p(label), logsumexp (and the Min-K%++ moments); one sweep
        over the head per batch, whichever is asked first (moments first if both are wanted)."""
        if self._stats is None or (moments and self._stats.mu is None):
            self._stats = linear_logprob_stats(
                self.h, self.head.weight, self.rows.labels.to(self.h.device), self.head.bias,
                moments=moments, backend=backend(),
            )  # fmt: skip
        return self._stats

    def token_logprobs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p [B, T-1] fp32, mask [B, T-1]) as `eval.mia.answer_token_logprobs`."""
        return self.rows.grid(self.stats().logprob), self.rows.sel.to(self.h.device)

    def token_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) [B, T-1] fp32 as `eval.mia.token_logprob_moments`."""
        st = self.stats(moments=True)
        return self.rows.grid(st.mu), self.rows.grid(st.sigma)

    def logprobs_of(self, ids: Sequence[int], lse: torch.Tensor, example: int) -> torch.Tensor:
        """[n_b, K] log-probabilities of the token `ids` at example `example`'s answer rows,
        given the rows' logsumexp `lse` [N] (from `stats`): K columns of the head, not V."""
        pick = (self.rows.example == example).to(self.h.device)
        index = torch.tensor(list(ids), dtype=torch.long, device=self.h.device)
        bias = None if self.head.bias is None else self.head.bias[index]
        z = F.linear(self.h[pick], self.head.weight[index], bias).float()
        return z - lse[pick][:, None]


@contextlib.contextmanager
def teacher_forced(model: Any, batch: Batch) -> Iterator[TeacherForced]:
    """No-grad scoring of `batch`'s answers with the head gathered for the block."""
    rows = AnswerRows.of(batch["labels"])
    with torch.no_grad():
        h = answer_states(model, batch, rows)
        head = output_head(model)
        with gathered(head_params(head)):
            yield TeacherForced(rows, h, head)
