"""What the general-ability protocols (POPE, MMBench) share: they measure whether unlearning
hurt the model's ordinary visual abilities, so they have no forget or retain people, no
validation split, and are scored by greedy generation parsed by each benchmark's own rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsunlearn.config import EvalConfig
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError
from dsunlearn.eval.evaluate import per_rank_batch
from dsunlearn.eval.scoring import eval_mode, generate_answers

TINY_MODEL_NOTE = (
    "on the built-in tiny models (4 layers, trained for minutes on fictitious faces, a closed "
    "word vocabulary) these scores mean little: they only show that the protocol runs; "
    "POPE and MMBench are meant for real models (LLaVA-1.5, Qwen2-VL, ...)"
)


def no_validation_split(benchmark: str) -> ConfigError:
    return ConfigError(
        f"{benchmark} has no validation split (a general-ability benchmark, reported only): "
        f"evaluate its test split (dsunlearn eval --split test, or eval.utility=[...] in a run)"
    )


def generate(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    cfg: EvalConfig,
    info: DistInfo,
    zero3: bool,
) -> list[str]:
    """Greedy answers (`cfg.gen_max_new_tokens` tokens) to every item, sharded over the ranks
    and gathered to all of them in item order; every rank must call this."""
    if not items:
        return []
    with eval_mode(model):
        return generate_answers(
            model,
            processor,
            items,
            per_rank_batch(cfg, info),
            cfg.gen_max_new_tokens,
            info,
            zero3,
        )


def slug(text: str) -> str:
    """A metric-name-safe form of a category ("finegrained_perception (instance-level)" ->
    "finegrained_perception_instance_level")."""
    out = "".join(c.lower() if c.isalnum() else "_" for c in text)
    return "_".join(p for p in out.split("_") if p) or "none"
