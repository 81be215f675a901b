"""Load (and save) a multimodal model with its processor: built-in tiny, local folder or hub id.

Under ZeRO-3 every path builds the model inside `deepspeed.zero.Init`, so no rank ever holds
the full set of weights: transformers does this itself while a `HfDeepSpeedConfig` is alive
(construction, weight init and checkpoint loading are then all partition-aware).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
)
from transformers.processing_utils import ProcessorMixin

from dsunlearn.errors import ModelError
from dsunlearn.fsutil import atomic_dir
from dsunlearn.models.families import (
    FAMILIES,
    family_of,
    family_of_arch,
    family_of_config,
    strip_wrappers,
)
from dsunlearn.models.tiny import TINY_MODELS, build_tiny_config, build_tiny_processor

# Architecture -> part -> parameter-name prefixes (with their trailing "."), derived from the
# family table (`dsunlearn.models.families`); the output head counts as the language model.
MODULE_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    arch: {
        "vision": tuple(p + "." for p in f.vision),
        "projector": tuple(p + "." for p in f.projector),
        "language": tuple(p + "." for p in (*f.language, *f.lm_head)),
    }
    for f in FAMILIES
    for arch in f.architectures
}

# The HfDeepSpeedConfig of the last ZeRO-3 load. transformers holds only a weakref to it, and
# later calls (generate's synced GPUs, embedding resizes) must still see ZeRO-3 as enabled.
_LIVE_HF_DS_CONFIG: Any = None


def block_linears(model: torch.nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules of the blocks (attention and MLP projections of every
    layer, and the projector's), as the family table lays them out; never the output head.
    What LoRA adapts (language model only) and MMUnlearner's Linear-only mask covers."""
    family = family_of(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module is not head
        and family.is_block_module(strip_wrappers(name))
    ]


def module_group(arch: str, param_name: str) -> str:
    """The part ("vision", "projector" or "language") a parameter belongs to; the output head is
    part of the language model. `arch` is the model's class name."""
    part = family_of_arch(arch).part(strip_wrappers(param_name))
    if part is None:
        raise ModelError(f"parameter {param_name!r} belongs to no known part of {arch}")
    return "language" if part == "lm_head" else part


def pick_attn_implementation() -> str:
    """FlashAttention-2 where it can run (installed and a CUDA device), else PyTorch SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _is_zero3(ds_config: dict | None) -> bool:
    if not ds_config:
        return False
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    return int(stage) == 3


def _activate_ds_config(ds_config: dict | None) -> None:
    """Make transformers see ZeRO-3 (or not) for the coming construction/loading."""
    global _LIVE_HF_DS_CONFIG
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    if _is_zero3(ds_config):
        _LIVE_HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)  # sets the global weakref
    else:
        _LIVE_HF_DS_CONFIG = None
        unset_hf_deepspeed_config()  # a stale ZeRO-3 config must not partition this model


def _builtin_names() -> str:
    return ", ".join(TINY_MODELS)


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else with slashes is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, local_files_only). Fails fast with one clear line."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (not a saved model)")
        return str(path), True
    if path.exists() or _looks_like_path(name_or_path):
        raise ModelError(f"model folder {path} does not exist")

    unknown = f"unknown model {name_or_path!r}: not a built-in ({_builtin_names()}), not a folder"
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except Exception as e:  # any invalid form is the user's input
        raise ModelError(f"{unknown}, and not a valid hub id") from e
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path, True  # cached: no network needed
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{unknown}, and not in the hub cache (offline mode)")
    # One quick probe: from_pretrained would retry every file for minutes before failing.
    try:
        model_info(name_or_path, timeout=15)
    except Exception as e:  # network, 404, gated: all mean "cannot load"
        raise ModelError(f"{unknown}, and not on the hub ({type(e).__name__})") from e
    return name_or_path, False


def _build_tiny(name: str, dtype: torch.dtype, seed: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    processor = build_tiny_processor(name)
    config = build_tiny_config(name, processor)
    kwargs = {"dtype": dtype, "attn_implementation": pick_attn_implementation()}
    if _LIVE_HF_DS_CONFIG is None:
        torch.manual_seed(seed)  # deterministic init: same seed, same weights
        return AutoModelForImageTextToText.from_config(config, **kwargs), processor

    # ZeRO-3: transformers builds inside zero.Init (partitioned at construction) but initialises
    # in another order, so the same seed would give other weights than without ZeRO. A tiny
    # model fits anywhere: initialise a plain copy and write it into the partitions.
    import deepspeed
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    unset_hf_deepspeed_config()
    torch.manual_seed(seed)
    reference = dict(AutoModelForImageTextToText.from_config(config, **kwargs).named_parameters())
    set_hf_deepspeed_config(_LIVE_HF_DS_CONFIG)
    model = AutoModelForImageTextToText.from_config(config, **kwargs)
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if deepspeed.comm.get_rank() == 0:
            with torch.no_grad():
                for key, param in params.items():
                    param.copy_(reference[key])
    return model, processor


def _check_family(source: str, local_only: bool) -> None:
    """Refuse, in one line that lists the supported ones, a model whose family is not in the
    table, before any weights are read."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source, local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load model {source}: {reason}") from e
    family_of_config(config, source)


def load_model_and_processor(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    ds_config: dict | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A model and its processor from a built-in tiny name, a saved folder or a hub id.

    With a ZeRO-3 `ds_config` the model is partitioned while it is built or loaded (call
    `dsunlearn.engine.dist.init_distributed` first). A folder or hub id must hold one of the
    families of `dsunlearn.models.families` (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL,
    Idefics3); any other architecture is refused with one line that lists them. `seed` only
    matters for built-in tiny models, which are freshly initialised.
    """
    _activate_ds_config(ds_config)
    if name_or_path in TINY_MODELS:
        return _build_tiny(name_or_path, dtype, seed)

    source, local_only = resolve_source(name_or_path)
    _check_family(source, local_only)
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=pick_attn_implementation(),
            local_files_only=local_only,
        )
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load model {source}: {reason}") from e
    return model, processor


def enable_activation_checkpointing(model: PreTrainedModel) -> dict[str, int]:
    """Recompute every decoder and vision-tower layer in the backward instead of keeping its
    activations (`model.gradient_checkpointing=true`). Non-reentrant: it works under ZeRO-3's
    parameter hooks and with frozen inputs, and gives the same gradients as without it.

    Returns the number of checkpointed layers per part; a tower with none is an error, since
    a silently uncheckpointed vision tower (thousands of image tokens) defeats the purpose.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False  # a KV cache is useless in training and clashes with recompute
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    arch = type(model).__name__
    parts: dict[str, int] = {"vision": 0, "language": 0}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            part = module_group(arch, name + ".weight")
            if part in parts:
                parts[part] += 1
    missing = [p for p, n in parts.items() if n == 0]
    if missing:
        raise ModelError(
            f"{arch}: activation checkpointing reached no layer of the {missing[0]} tower"
        )
    return parts


def save_model_and_processor(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    out_dir: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save weights (safetensors), config and processor so `load_model_and_processor` reloads them.

    A ZeRO-3 partitioned model needs `state_dict`, its full weights gathered first. The
    folder appears only once complete (atomic rename), so a crash never leaves half a checkpoint.
    """
    if state_dict is None and any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ModelError(
            "save_model_and_processor needs a full model, not a ZeRO-3 partitioned one"
        )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
    return out
