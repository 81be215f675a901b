"""Identity probe: can a linear classifier read *who* a face is from the model's hidden states?

Features: the hidden state at the answer position of "Who is this person?" (the last prompt
token, whose output would be the answer's first token), at the last layer and a middle one.
The probe is trained on every person's training pictures and tested on the forget people's
held-out pictures. The gold model gives the floor: faces differ visually, so even a model that
never learned the names separates them somewhat. (Probing for unlearned knowledge: Patil et
al. 2023, "Can Sensitive Information Be Deleted From LLMs?"; Lynch et al. 2024.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsunlearn.audit.context import AuditContext, Source
from dsunlearn.engine.batches import to_device
from dsunlearn.eval.scoring import sharded_map
from dsunlearn.models.encode import encode_for_generation, model_inputs

PROBE_STEPS = 200  # L-BFGS iterations: the problem is small and convex


def answer_position_states(
    ctx: AuditContext, model: Any, processor: Any, items: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """{"middle": [N, H], "last": [N, H]} fp32 hidden states at each prompt's last token."""

    def fn(batch: list[Any], _rows: list[int]) -> list[tuple[list[float], list[float]]]:
        enc = encode_for_generation(
            processor, [it.question for it in batch], [it.image for it in batch]
        )
        enc = to_device(enc, ctx.info.device)  # left-padded: every prompt ends at position -1
        out = model(**model_inputs(enc), output_hidden_states=True, logits_to_keep=1)
        states = out.hidden_states  # embeddings, then each decoder layer's output
        middle, last = states[len(states) // 2][:, -1], states[-1][:, -1]
        return [(m.float().tolist(), x.float().tolist()) for m, x in zip(middle, last, strict=True)]

    rows = sharded_map(items, ctx.per_rank, ctx.info, fn)
    return {
        "middle": torch.tensor([r[0] for r in rows], dtype=torch.float64),
        "last": torch.tensor([r[1] for r in rows], dtype=torch.float64),
    }


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features, fit by L-BFGS in float64
    (deterministic: every rank fits the same probe on the same gathered features).
    Returns (weight [C, H], bias [C], feature mean [H], feature std [H])."""
    x = x.double()
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mu) / sd
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=PROBE_STEPS, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mu, sd


def probe_accuracy(probe: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose highest-scoring class is their label (nan without rows)."""
    if len(y) == 0:
        return float("nan")
    w, b, mu, sd = probe
    pred = (((x.double() - mu) / sd) @ w.T + b).argmax(dim=1)
    return float((pred == y).double().mean())


def identity_probe(ctx: AuditContext, source: Source) -> dict[str, Any]:
    """{layer: {"forget_heldout": acc, "retain_heldout": acc}, "chance": 1 / people, ...}."""
    sets = ctx.sets
    label = {pid: i for i, pid in enumerate(sets.people)}
    groups = {
        "train": sets.identity_train,
        "forget_heldout": sets.identity_test,
        "retain_heldout": sets.identity_retain_test,
    }
    with ctx.frozen(source) as (model, processor):
        feats = {
            k: answer_position_states(ctx, model, processor, v) for k, v in groups.items() if v
        }
    labels = {k: torch.tensor([label[it.entity_id] for it in v]) for k, v in groups.items()}
    out: dict[str, Any] = {
        "chance": 1.0 / len(sets.people),
        "n": {k: len(v) for k, v in groups.items()},
    }
    for layer in ("middle", "last"):
        probe = fit_probe(
            feats["train"][layer], labels["train"], len(sets.people), ctx.cfg.probe_l2
        )
        out[layer] = {
            k: probe_accuracy(probe, feats[k][layer], labels[k]) if k in feats else float("nan")
            for k in groups
        }
    return out
