"""LoRA adapters (peft) on the language model, for methods that train adapters, not weights.

SIU's paper fine-tunes LLaVA with LoRA. The default targets are every `nn.Linear` of the
language model's blocks, never `lm_head` (the vision tower and projector stay frozen), taken
from the family table (`dsunlearn.models.families`) and resolved to exact module names, so that
no architecture-specific suffix list is needed. Under ZeRO-3 the adapters are created after the
base model was partitioned; `deepspeed.initialize` partitions them too.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dsunlearn.config import LoraConfig
from dsunlearn.errors import ConfigError, ModelError
from dsunlearn.models.families import family_of, strip_wrappers
from dsunlearn.models.loader import block_linears


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of every block Linear of the language model (never `lm_head`), from the family
    table; an architecture not in it is refused with the supported list."""
    family = family_of(model)
    return [
        name
        for name in block_linears(model)
        if family.part(strip_wrappers(name) + ".weight") == "language"
    ]


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> Any:
    """The model wrapped in peft LoRA adapters (only they train), or unchanged when r == 0.

    The adapters' random initialisation is seeded (without touching the global RNG): every
    rank must build the same A matrices before ZeRO-3 partitions them, and a rerun the same.
    """
    if cfg.r == 0:
        return model
    if cfg.r < 0 or cfg.alpha <= 0 or not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"lora needs r >= 0, alpha > 0 and 0 <= dropout < 1, got {cfg}")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n for n, _ in model.named_modules()}
    if cfg.target_modules:
        targets = [
            n for n in names if any(n == t or n.endswith("." + t) for t in cfg.target_modules)
        ]
        if not targets:
            raise ConfigError(
                f"lora.target_modules {cfg.target_modules} match no module of the model"
            )
    else:
        targets = default_lora_targets(model)
    if not targets:
        raise ModelError(f"{type(model).__name__}: no Linear layer of the language model to adapt")
    pattern = "^(" + "|".join(re.escape(t) for t in sorted(targets)) + ")$"
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern
    )
    with torch.random.fork_rng(devices=[]):  # adapters are created on the CPU, then moved
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)
