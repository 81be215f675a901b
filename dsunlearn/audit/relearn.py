"""Relearning attack: a few fine-tuning steps on the identity question of one training picture
per forget person, then the *other* facts asked about the face.

A model that removed the face->facts link has to learn it again, like the gold model (which
never saw the faces but knows the facts by name). One that only hid it gets it back faster:
its curve rises above gold's after the same steps. (Relearning attacks: Lynch et al. 2024,
"Eight Methods to Evaluate Robust Unlearning in LLMs"; Hu et al. 2024, "Jogging the Memory of
Unlearned LLMs Through Targeted Relearning Attacks".)
"""

from __future__ import annotations

from typing import Any

from dsunlearn.audit.context import AuditContext, Source
from dsunlearn.engine.batches import global_batches
from dsunlearn.engine.engine import optimizer_step
from dsunlearn.models.encode import logits_of, sequence_nll
from dsunlearn.recipes.common import encode_batch


def relearn(ctx: AuditContext, source: Source) -> dict[str, Any]:
    """{"steps": [0, k...], "forget_facts": [...], "forget_heldout_facts": [...], "loss": [...]}:
    accuracies before relearning and after each of `relearn_steps`; every rank takes part."""
    steps = sorted(set(ctx.cfg.relearn_steps))
    sets, info = ctx.sets, ctx.info
    out: dict[str, Any] = {"steps": [], "forget_facts": [], "forget_heldout_facts": [], "loss": []}
    with ctx.trainable(source, ctx.cfg.relearn_lr) as (engine, processor):

        def measure(step: int, loss: float | None) -> None:
            out["steps"].append(step)
            out["forget_facts"].append(ctx.mc_accuracy(engine.module, processor, sets.forget_facts))
            heldout = ctx.mc_accuracy(engine.module, processor, sets.forget_heldout_facts)
            out["forget_heldout_facts"].append(heldout)
            out["loss"].append(loss)

        measure(0, None)
        stream = global_batches(
            sets.relearn, ctx.cfg.relearn_batch_size, info.rank, info.world_size, ctx.seed
        )
        engine.train()
        for step in range(1, steps[-1] + 1):
            batch = encode_batch(processor, next(stream), info.device)
            loss = sequence_nll(logits_of(engine, batch), batch["labels"]).mean()
            optimizer_step(engine, loss, f"relearning step {step}")
            if step in steps:
                measure(step, float(loss.item()))
    return out
