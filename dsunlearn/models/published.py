"""The published 7B-8B architectures, as transformers configs built in code, and their shapes.

Why in code: `dsunlearn plan` must size a run of LLaVA-1.5-7B or Qwen2-VL-7B on a machine that
cannot reach the hub, and the real-shape CPU runs need the same layers at a cut depth. The
values below are those of each model's hub `config.json` (named above each builder), written
here from that file's published content (the hub cannot be read from this repository's test
machines). They are cross-checked by the parameter count of a `meta`-device instantiation
(`param_counts`), which must equal the count the model card states; `tests/test_plan.py` does it.

`model_shape` is the one table of a model's shape for `dsunlearn plan` and the memory
benchmarks: exact parameter counts per part (vision, projector, language, embeddings, lm_head),
every tensor's size (ZeRO-3 pads each one to a multiple of the world size), the decoder's and
the vision tower's widths and depths, and the tokens one picture becomes. It reads a published
name, a built-in tiny name or a local HF folder, and never downloads.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Idefics3Config,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    PretrainedConfig,
    Qwen2VLConfig,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

from dsunlearn.errors import ModelError
from dsunlearn.models.families import family_of_config, strip_wrappers

PARTS: tuple[str, ...] = ("vision", "projector", "language", "embeddings", "lm_head")
PICTURE_SIDE = 448  # the square picture `image_tokens` sizes a real model's input for


# --------------------------------------------------------------------------- the configs


def _clip_vit_l14_336(layers: int | None) -> CLIPVisionConfig:
    """openai/clip-vit-large-patch14-336, the tower of both LLaVA configs below."""
    return CLIPVisionConfig(
        hidden_size=1024,
        image_size=336,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=24 if layers is None else layers,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _vicuna_7b(layers: int | None) -> LlamaConfig:
    """lmsys/vicuna-7b-v1.5 (Llama-2-7B shape) with LLaVA's 32064-entry vocabulary."""
    return LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32 if layers is None else layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def llava_15_7b(text_layers: int | None = None, vision_layers: int | None = None) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf/config.json: CLIP ViT-L/14 at 336 px (24 layers, width 1024;
    features of the second-to-last layer, CLS dropped: 24 x 24 = 576 tokens per image), a
    2-layer GELU MLP projector 1024 -> 4096 -> 4096, Vicuna-7B v1.5 (32 layers, width 4096,
    32 heads, MLP 11008, vocabulary 32064, RoPE theta 1e4, 4096 positions), untied head."""
    return LlavaConfig(
        vision_config=_clip_vit_l14_336(vision_layers),
        text_config=_vicuna_7b(text_layers),
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        pad_token_id=32001,
        tie_word_embeddings=False,
    )


# llava-hf/llava-v1.6-vicuna-7b-hf/config.json: image_grid_pinpoints.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def llava_next_7b(
    text_layers: int | None = None, vision_layers: int | None = None
) -> LlavaNextConfig:
    """llava-hf/llava-v1.6-vicuna-7b-hf/config.json (LLaVA-NeXT on Vicuna-7B, chosen over the
    Mistral-7B variant because it shares LLaVA-1.5's decoder: the two differ only in "anyres"
    image tokens). The same tower, projector and decoder as LLaVA-1.5-7B, plus the learned
    row-end embedding `image_newline`; a picture is a 336 px base view plus a grid of 336 px crops
    (`image_grid_pinpoints`)."""
    return LlavaNextConfig(
        vision_config=_clip_vit_l14_336(vision_layers),
        text_config=_vicuna_7b(text_layers),
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        use_image_newline_parameter=True,
        tie_word_embeddings=False,
    )


def qwen2_vl_7b(text_layers: int | None = None, vision_layers: int | None = None) -> Qwen2VLConfig:
    """Qwen/Qwen2-VL-7B-Instruct/config.json: a 32-block ViT (width 1280, 16 heads, MLP ratio 4,
    patch 14, temporal patch 2) whose merger joins 2 x 2 patches into one 3584-wide token; the
    Qwen2-7B decoder (28 layers, width 3584, 28 heads, 4 KV heads, MLP 18944, vocabulary 152064,
    RMS eps 1e-6, 32768 positions), M-RoPE theta 1e6 with mrope_section [16, 24, 24] (the 64
    rotary frequencies of head dim 128 split over time, height, width), untied head. A 448 x 448
    picture: 448 / 14 = 32 -> 32 x 32 = 1024 patches in the tower -> 16 x 16 = 256 tokens."""
    text = {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28 if text_layers is None else text_layers,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28 if text_layers is None else text_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [16, 24, 24],
        },
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 32 if vision_layers is None else vision_layers,
        "embed_dim": 1280,
        "hidden_size": 3584,  # the merger's output: the decoder's width
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=False,
    )


def idefics3_8b(text_layers: int | None = None, vision_layers: int | None = None) -> Idefics3Config:
    """HuggingFaceM4/Idefics3-8B-Llama3/config.json: a SigLIP-so400m tower (27 layers, width
    1152, 16 heads, MLP 4304, patch 14) on 364 px tiles, a 2 x 2 pixel shuffle and one Linear
    4608 -> 4096 (26 x 26 patches -> 13 x 13 = 169 tokens per tile), Llama-3-8B (32 layers,
    width 4096, 32 heads, 8 KV heads, MLP 14336, RoPE theta 5e5, vocabulary 128259: Llama 3's
    128256 plus the image tokens), untied head."""
    vision = Idefics3VisionConfig(
        hidden_size=1152,
        image_size=364,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=27 if vision_layers is None else vision_layers,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    text = LlamaConfig(
        vocab_size=128259,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32 if text_layers is None else text_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        pad_token_id=128002,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
    )
    return Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=128257,
        scale_factor=2,
        tie_word_embeddings=False,
        pad_token_id=128002,
    )


@dataclass(frozen=True)
class Published:
    """One published model: its hub id, config builder and the parameter count its card gives."""

    short: str  # what a person types, e.g. "qwen2-vl-7b"
    hub_id: str
    build: Callable[[int | None, int | None], PretrainedConfig]
    card_params: float  # the well-known total, e.g. 8.29e9 (the check's yardstick, 3 digits)
    # Idefics3's processor (preprocessor_config.json): a picture is resized to a longest edge of
    # `tiles` x the tile side, cut into tiles x tiles tiles, plus one global view.
    tiles: int = 0


PUBLISHED: tuple[Published, ...] = (
    Published("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", llava_15_7b, 7.06e9),
    Published("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", llava_next_7b, 7.06e9),
    Published("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", qwen2_vl_7b, 8.29e9),
    # size.longest_edge 1456 = 4 x 364, max_image_size.longest_edge 364
    Published("idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3", idefics3_8b, 8.46e9, tiles=4),
)
_BY_NAME: dict[str, Published] = {
    key: p for p in PUBLISHED for key in (p.short, p.hub_id, p.hub_id.lower())
}


def published(name: str) -> Published | None:
    """The published model a name (short name or hub id, any case) stands for, or None."""
    return _BY_NAME.get(name) or _BY_NAME.get(name.lower())


def published_config(
    name: str, text_layers: int | None = None, vision_layers: int | None = None
) -> PretrainedConfig:
    """A published model's config, optionally cut to `text_layers` decoder layers and
    `vision_layers` vision layers (every width, head count and vocabulary unchanged): the
    real-shape CPU runs keep each layer's shape at a depth a CPU can hold."""
    spec = published(name)
    if spec is None:
        known = ", ".join(p.short for p in PUBLISHED)
        raise ModelError(f"unknown published model {name!r}; known: {known}")
    for what, n in (("text_layers", text_layers), ("vision_layers", vision_layers)):
        if n is not None and n < 1:
            raise ModelError(f"{what} must be at least 1, got {n}")
    return spec.build(text_layers, vision_layers)


def cut_depth(name: str, text_layers: int, vision_layers: int) -> PretrainedConfig:
    """`published_config` at N decoder layers and M vision layers. A LLaVA tower reads the
    second-to-last layer's features, so it needs M >= 2."""
    return published_config(name, text_layers, vision_layers)


# --------------------------------------------------------------------------- counting


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model of `config` on the `meta` device: every tensor's shape, no memory, no init."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _part_of(model: torch.nn.Module, config: PretrainedConfig) -> Callable[[str, Any], str]:
    family = family_of_config(config)
    embed = model.get_input_embeddings()
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()

    def part(name: str, param: Any) -> str:
        if id(param) in embed_ids:
            return "embeddings"
        found = family.part(strip_wrappers(name))
        if found is None:
            raise ModelError(f"parameter {name} belongs to no part of {family.name}")
        return found

    return part


def tensor_numels(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter tensor's element count, per part (PARTS), from a meta instantiation.
    Tied weights are counted once, as `named_parameters` lists them."""
    return _numels(meta_model(config), config)


def _numels(model: torch.nn.Module, config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    part = _part_of(model, config)
    out: dict[str, list[int]] = {p: [] for p in PARTS}
    for name, param in model.named_parameters():
        out[part(name, param)].append(param.numel())
    return {p: tuple(v) for p, v in out.items()}


def _language_linears(
    model: torch.nn.Module, config: PretrainedConfig
) -> tuple[tuple[int, int], ...]:
    """(in, out) features of every language block Linear: what LoRA adapts by default."""
    family = family_of_config(config)
    head = model.get_output_embeddings()
    return tuple(
        (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and m is not head
        and family.is_block_module(name)
        and family.part(name + ".weight") == "language"
    )


def param_counts(config: PretrainedConfig) -> dict[str, int]:
    """Exact parameter counts per part (vision, projector, language, embeddings, lm_head) and
    "total"; "language" is the decoder without its input embeddings and output head."""
    counts = {p: sum(v) for p, v in tensor_numels(config).items()}
    counts["total"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------- image tokens


@dataclass(frozen=True)
class ImageTokens:
    """What one picture costs: tokens through the vision tower (all views, CLS included) and
    image tokens the decoder reads (framing tokens included)."""

    vision: int
    text: int
    note: str


def _best_pinpoint(side: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's `select_best_resolution` for a square picture: the grid resolution that
    keeps the most of its pixels, then wastes the least."""
    best, best_fit, best_waste = (0, 0), -1, math.inf
    for h, w in pinpoints:
        scale = min(w / side, h / side)
        dw, dh = int(side * scale), int(side * scale)
        fit = min(dw * dh, side * side)
        waste = w * h - fit
        if fit > best_fit or (fit == best_fit and waste < best_waste):
            best, best_fit, best_waste = (h, w), fit, waste
    return best


def image_tokens(config: PretrainedConfig, side: int, tiles: int = 0) -> ImageTokens:
    """Tokens of one square `side` x `side` picture, from the model config (and, for Idefics3,
    the processor's tile grid `tiles`; 0 = from the side)."""
    mtype = config.model_type
    v = config.vision_config
    if mtype in ("llava", "llava_next"):
        per_side = v.image_size // v.patch_size
        n = per_side * per_side
        keep_cls = getattr(config, "vision_feature_select_strategy", "default") == "full"
        base = n + (1 if keep_cls else 0)
        if mtype == "llava":
            return ImageTokens(n + 1, base, f"{per_side}x{per_side} patches")
        h, w = _best_pinpoint(side, config.image_grid_pinpoints)
        gh, gw = h // v.image_size, w // v.image_size
        rows, cols = gh * per_side, gw * per_side  # a square picture needs no unpadding
        text = base + rows * (cols + 1)  # + one newline embedding per row
        note = f"base {per_side}x{per_side} + {gh}x{gw} crops of {per_side}x{per_side} + newlines"
        return ImageTokens((1 + gh * gw) * (n + 1), text, note)
    if mtype in ("qwen2_vl", "qwen2_5_vl"):
        unit = v.patch_size * v.spatial_merge_size
        resized = max(unit, round(side / unit) * unit)
        patches = (resized // v.patch_size) ** 2
        merged = patches // v.spatial_merge_size**2
        note = f"{resized // v.patch_size}x{resized // v.patch_size} patches -> {merged} merged"
        return ImageTokens(patches, merged, note)
    if mtype == "idefics3":
        per_side = v.image_size // v.patch_size
        seq = per_side * per_side // config.scale_factor**2
        grid = tiles or max(1, math.ceil(side / v.image_size))
        views = grid * grid + (1 if grid > 1 else 0)
        # per tile <fake><row_i_col_j> + seq; the global view <fake><global-img> + seq + <fake>;
        # a newline after each row of tiles
        framing = 2 * grid * grid + grid + 3 if grid > 1 else 3
        note = f"{grid}x{grid} tiles + global view, {seq} tokens each"
        return ImageTokens(views * per_side * per_side, views * seq + framing, note)
    raise ModelError(f"no image-token rule for model_type {mtype!r}")


# --------------------------------------------------------------------------- the shape table


@dataclass(frozen=True)
class ModelShape:
    """A model's shape, as `dsunlearn plan` and the memory benchmarks need it."""

    name: str
    source: str  # "published <hub id>", "built-in tiny", "folder <path>"
    family: str
    numels: dict[str, tuple[int, ...]]  # part -> every tensor's element count
    hidden: int  # decoder width
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    image: ImageTokens
    language_linears: tuple[tuple[int, int], ...]  # (in, out) of the language block Linears

    @property
    def counts(self) -> dict[str, int]:
        out = {p: sum(v) for p, v in self.numels.items()}
        out["total"] = sum(out.values())
        return out

    @property
    def total(self) -> int:
        return sum(sum(v) for v in self.numels.values())

    def all_numels(self, parts: tuple[str, ...] = PARTS) -> list[int]:
        return [n for p in parts for n in self.numels[p]]


def _vision_dims(config: PretrainedConfig) -> tuple[int, int]:
    v = config.vision_config
    width = getattr(v, "embed_dim", None) or v.hidden_size  # Qwen2-VL: embed_dim
    depth = getattr(v, "depth", None) or v.num_hidden_layers
    return int(width), int(depth)


def shape_of_config(name: str, source: str, config: PretrainedConfig, side: int, tiles: int = 0):
    """The `ModelShape` of a config (meta instantiation for the counts)."""
    t = config.text_config
    v_width, v_depth = _vision_dims(config)
    model = meta_model(config)
    return ModelShape(
        name=name,
        source=source,
        family=family_of_config(config).name,
        numels=_numels(model, config),
        hidden=int(t.hidden_size),
        layers=int(t.num_hidden_layers),
        heads=int(t.num_attention_heads),
        kv_heads=int(getattr(t, "num_key_value_heads", None) or t.num_attention_heads),
        intermediate=int(t.intermediate_size),
        vocab=int(t.vocab_size),
        vision_hidden=v_width,
        vision_layers=v_depth,
        image=image_tokens(config, side, tiles),
        language_linears=_language_linears(model, config),
    )


def cut_shape(
    name: str, text_layers: int, vision_layers: int, picture_side: int | None = None
) -> ModelShape:
    """The `ModelShape` of a published model cut to N decoder and M vision layers (the
    real-shape CPU runs), to set `dsunlearn.plan`'s figures beside their measured bytes."""
    spec = published(name)
    config = cut_depth(name, text_layers, vision_layers)
    source = f"published {spec.hub_id if spec else name}, {text_layers}+{vision_layers} layers"
    side = picture_side or PICTURE_SIDE
    return shape_of_config(name, source, config, side, spec.tiles if spec else 0)


def _folder_tiles(folder: Path) -> int:
    """Idefics3's tile grid from a saved processor (size.longest_edge / max_image_size)."""
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return 0
    try:
        cfg = json.loads(pre.read_text())
        return int(cfg["size"]["longest_edge"]) // int(cfg["max_image_size"]["longest_edge"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0


@functools.lru_cache(maxsize=32)
def _published_shape(name: str, side: int) -> ModelShape:
    """Published shapes never change: each is instantiated on `meta` once per process."""
    spec = published(name)
    assert spec is not None
    return shape_of_config(
        name, f"published {spec.hub_id}", spec.build(None, None), side, spec.tiles
    )


def model_shape(name: str, picture_side: int | None = None) -> ModelShape:
    """The shape of the model a config names: a published model (short name or hub id), a
    built-in tiny name or a local HF folder (its config.json). Anything else is one line: no
    download is attempted. `picture_side`: the square picture's side (default 448 px for real
    models, the tiny models' 32 px)."""
    spec = published(name)
    if spec is not None:
        return _published_shape(name, picture_side or PICTURE_SIDE)
    from dsunlearn.models.tiny import (
        IMAGE_SIZE,
        TINY_MODELS,
        build_tiny_config,
        build_tiny_processor,
    )

    if name in TINY_MODELS:
        config = build_tiny_config(name, build_tiny_processor(name))
        return shape_of_config(name, "built-in tiny", config, picture_side or IMAGE_SIZE)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelError(f"model folder {folder} has no config.json (not a saved model)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"cannot read {folder / 'config.json'}: {reason}") from e
        family_of_config(config, str(folder))  # one line for an unsupported family
        side = picture_side or PICTURE_SIDE
        return shape_of_config(name, f"folder {folder}", config, side, _folder_tiles(folder))
    known = ", ".join(p.short for p in PUBLISHED)
    raise ModelError(
        f"unknown model {name!r}: not a published model the planner knows ({known}, or their "
        f"hub ids), not a built-in ({', '.join(TINY_MODELS)}), not a local folder; the planner "
        "never downloads: save the model's config.json in a folder and pass that"
    )
