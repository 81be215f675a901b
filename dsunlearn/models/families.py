"""The supported model families: where each keeps its vision tower, projector and language model.

One table, keyed by the config's `model_type` and the model class name (transformers 5.x
parameter names), is the only place that knows a family's layout. `module_group` (freeze or
target a part; MMUnlearner's per-part masks and heat maps), `block_linears` (MMUnlearner's
Linear-only mask) and LoRA's default targets all read it, and a model or a saved folder whose
family is not in it is refused with one line that lists the supported ones.

Each family gives:

- `vision`, `projector`, `language`, `lm_head`: parameter-name prefixes of its parts (a prefix
  matches the name itself or the name followed by "."; the longest matching prefix wins, so a
  projector may sit inside the vision tower, as Qwen2-VL's merger does);
- `blocks`: the modules whose `nn.Linear` layers are the "block Linears" (attention and MLP
  projections of every layer, and the projector's); "*" stands for a layer number. The output
  head is never one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from dsunlearn.errors import ModelError

GROUPS: tuple[str, ...] = ("vision", "projector", "language")  # what `module_group` returns

# Prefixes that wrappers put in front of the model's own names (DDP/DeepSpeed, PEFT, compile).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "base_model.model.", "_orig_mod.")


def _blocks_regex(blocks: tuple[str, ...]) -> re.Pattern[str]:
    """A regex for any module below one of `blocks` ("a.layers.*" -> a.layers.<digits>.<any>);
    the layer number, where the block has one, is the group "layer<i>" of the i-th block."""
    alts = [re.escape(b).replace(r"\*", rf"(?P<layer{i}>\d+)", 1) for i, b in enumerate(blocks)]
    return re.compile("|".join(rf"(?:{a})\..+" for a in alts))


@dataclass(frozen=True)
class Family:
    """One model family's layout (see the module docstring)."""

    name: str  # what a person calls it, e.g. "LLaVA-1.5"
    model_types: tuple[str, ...]  # config.model_type values
    architectures: tuple[str, ...]  # model class names (config.architectures)
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    language: tuple[str, ...]
    lm_head: tuple[str, ...]
    blocks: tuple[str, ...]
    block_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_re", _blocks_regex(self.blocks))

    def prefixes(self) -> dict[str, tuple[str, ...]]:
        """Part -> prefixes, with the output head as its own part."""
        return {
            "vision": self.vision,
            "projector": self.projector,
            "language": self.language,
            "lm_head": self.lm_head,
        }

    def part(self, param_name: str) -> str | None:
        """The part of a (wrapper-free) name: vision, projector, language, lm_head or None."""
        best, best_len = None, -1
        for part, prefixes in self.prefixes().items():
            for prefix in prefixes:
                hit = param_name == prefix or param_name.startswith(prefix + ".")
                if hit and len(prefix) > best_len:
                    best, best_len = part, len(prefix)
        return best

    def is_block_module(self, module_name: str) -> bool:
        """Whether a (wrapper-free) module name lies in one of the blocks (or the projector)."""
        return self.block_re.fullmatch(module_name) is not None

    def layer(self, name: str) -> int | None:
        """The layer number of a (wrapper-free) module or parameter name inside a numbered block
        (vision or language layers), None elsewhere (projector, embeddings, norms, head)."""
        m = self.block_re.fullmatch(name)
        if m is None:
            return None
        numbers = [int(v) for v in m.groupdict().values() if v is not None]
        return numbers[0] if numbers else None


_LLAVA_LAYOUT: dict[str, Any] = {
    "vision": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "language": ("model.language_model",),
    "lm_head": ("lm_head",),
    "blocks": (
        "model.vision_tower.encoder.layers.*",
        "model.multi_modal_projector",
        "model.language_model.layers.*",
    ),
}
_QWEN_VL_LAYOUT: dict[str, Any] = {
    "vision": ("model.visual",),
    "projector": ("model.visual.merger",),  # inside `visual`: the longest prefix wins
    "language": ("model.language_model",),
    "lm_head": ("lm_head",),
    "blocks": ("model.visual.blocks.*", "model.visual.merger", "model.language_model.layers.*"),
}

FAMILIES: tuple[Family, ...] = (
    Family("LLaVA-1.5", ("llava",), ("LlavaForConditionalGeneration",), **_LLAVA_LAYOUT),
    Family(
        "LLaVA-NeXT",
        ("llava_next",),
        ("LlavaNextForConditionalGeneration",),
        **{
            **_LLAVA_LAYOUT,
            # the learned row-end embedding is laid out with the projected image features
            "projector": ("model.multi_modal_projector", "model.image_newline"),
        },
    ),
    Family("Qwen2-VL", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), **_QWEN_VL_LAYOUT),
    Family(
        "Qwen2.5-VL", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",), **_QWEN_VL_LAYOUT
    ),
    Family(
        "Idefics3",
        ("idefics3",),
        ("Idefics3ForConditionalGeneration",),
        vision=("model.vision_model",),
        projector=("model.connector",),  # pixel shuffle + modality projection
        language=("model.text_model",),
        lm_head=("lm_head",),
        blocks=(
            "model.vision_model.encoder.layers.*",
            "model.connector",
            "model.text_model.layers.*",
        ),
    ),
)

_BY_ARCH: dict[str, Family] = {a: f for f in FAMILIES for a in f.architectures}
_BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    """The supported architectures, for error messages: "LlavaForConditionalGeneration
    (LLaVA-1.5), ..."."""
    return ", ".join(f"{a} ({f.name})" for f in FAMILIES for a in f.architectures)


def unsupported(what: str) -> ModelError:
    return ModelError(f"unsupported architecture {what}; supported: {supported()}")


def family_of_arch(arch: str) -> Family:
    """The family of a model class name, e.g. "LlavaForConditionalGeneration"."""
    if arch not in _BY_ARCH:
        raise unsupported(repr(arch))
    return _BY_ARCH[arch]


def family_of_config(config: Any, source: str | None = None) -> Family:
    """The family of a config (a `PretrainedConfig` or its dict): by `model_type`, which picks
    the class `AutoModelForImageTextToText` builds, else by `architectures`."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    model_type = get("model_type")
    archs = list(get("architectures") or [])
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    for arch in archs:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    what = f"{archs[0] if archs else '?'!r} (model_type {model_type!r})"
    raise unsupported(what + (f" in {source}" if source else ""))


def unwrapped(model: Any) -> torch.nn.Module:
    """The transformers model inside DeepSpeed (`.module`), torch.compile and peft wrappers."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def language_layers(model: Any) -> torch.nn.ModuleList:
    """The language model's decoder layers, in order (RMU steers one and trains a few)."""
    hf = unwrapped(model)
    prefix = family_of(model).language[0]
    layers = getattr(hf.get_submodule(prefix), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ModelError(f"{type(hf).__name__}: no decoder layers under {prefix}.layers")
    return layers


def family_of(model: Any) -> Family:
    """The family of a (possibly wrapped) model instance."""
    return family_of_arch(type(unwrapped(model)).__name__)


def strip_wrappers(name: str) -> str:
    """A parameter or module name without the prefixes that wrappers add."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name
