"""Models: built-in tiny families, loading/saving (ZeRO-3 aware), and example encoding."""

from dsunlearn.models.encode import (
    IGNORE_INDEX,
    build_prompt,
    encode_examples,
    encode_for_generation,
    encode_for_loss,
    logits_of,
    sequence_logprob_sum,
    sequence_nll,
)
from dsunlearn.models.loader import (
    MODULE_GROUPS,
    load_model_and_processor,
    module_group,
    pick_attn_implementation,
    save_model_and_processor,
)
from dsunlearn.models.tiny import TINY_MODELS, build_tiny_config, build_tiny_processor

__all__ = [
    "IGNORE_INDEX",
    "MODULE_GROUPS",
    "TINY_MODELS",
    "build_prompt",
    "build_tiny_config",
    "build_tiny_processor",
    "encode_examples",
    "encode_for_generation",
    "encode_for_loss",
    "load_model_and_processor",
    "logits_of",
    "module_group",
    "pick_attn_implementation",
    "save_model_and_processor",
    "sequence_logprob_sum",
    "sequence_nll",
]
