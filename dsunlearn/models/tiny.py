"""Built-in tiny multimodal models that need no download.

Four families mirror the real targets at toy scale so every code path (processor expansion of
image tokens, ZeRO-3 partitioning, save/reload) runs on a CPU in seconds (a few M parameters):

- ``tiny-llava`` (LLaVA-1.5): CLIP ViT (32x32 images, patch 8 -> 16 image tokens) + Llama.
- ``tiny-qwen2-vl``: Qwen2-VL vision tower (32x32, patch 4, 2x2 merge -> 16 image tokens) + Qwen2
  decoder with M-RoPE.
- ``tiny-llava-next`` (LLaVA-NeXT, "anyres"): a 32x32 image becomes a 16x16 base view plus a 2x2
  grid of 16x16 crops through a CLIP ViT (patch 4), unpadded and packed with a learned newline
  embedding per row -> 16 + 8 x (8 + 1) = 88 image tokens; Llama decoder.
- ``tiny-idefics3``: the image is split into 2x2 tiles of 16x16 plus a global view, each through a
  SigLIP-style ViT (patch 4, 16 patches) and a 2x2 pixel shuffle -> 4 tokens per view, framed by
  `<fake_token_around_image>`, `<row_i_col_j>` and `<global-img>` tags; Llama decoder.

Mllama (cross-attention to image tiles) is not built in: its processor nests a flat image list
as one sample (a batch with a text-only row fails), and its per-token `cross_attention_mask`
[B, T, images, tiles] does not fit the token-insertion path the other families share.

Tokenizers (all deterministic, built in-process, no download):

- ``tiny-llava`` and ``tiny-llava-next`` use a word-level tokenizer over `tiny_vocabulary()`
  (`build_tiny_tokenizer`): every word of the built-in world is one token, split like
  `split_words`, and answers are short token sequences. Learned tiny-llava checkpoints depend on
  exactly this vocabulary.
- ``tiny-qwen2-vl`` and ``tiny-idefics3`` use a byte-level BPE tokenizer
  (`build_tiny_bpe_tokenizer`) trained on the built-in world's text, like real Qwen2-VL's:
  Qwen2's split regex, GPT-2 byte alphabet, no prefix space (both the same merges; only their
  special tokens differ). A word tokenizes differently at the start of a text than after a space
  ("Jorna" vs " Jorna" -> "J"... vs "ĠJ"...), entity names are split into several pieces, and no
  input is ever unknown. Code that maps names or phrases to token ids is tested against this
  behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from dsunlearn.data import siu_templates
from dsunlearn.data.vocab import EXTRA_WORDS, FACTS, IDENTITY_QUESTIONS, tiny_vocabulary
from dsunlearn.errors import ModelError

IMAGE_SIZE = 32  # both families: square RGB images of this side

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
BASE_SPECIALS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
QWEN_SPECIALS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_NEXT_SPECIALS: tuple[str, ...] = (IMAGE, "[INST]", "[/INST]")
# Idefics3's image framing: every tile and the global view sit between fake tokens, tagged with
# its grid position (up to 6x6, as the processor knows them) or <global-img>.
IDEFICS3_SPECIALS: tuple[str, ...] = (
    "<fake_token_around_image>",
    IMAGE,
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

# "USER: <image> question ASSISTANT:" -- the LLaVA-1.5 format. Text items are written verbatim, an
# image item becomes one <image> that the processor expands to one token per patch.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} </s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Qwen2-VL's format without the default system prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-v1.6-mistral's format: "[INST] <image>\nquestion [/INST]", images before the text.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
)

# Idefics3-8B-Llama3's format without <|begin_of_text|>: "User:<image>question<end_of_utterance>\n
# Assistant:" (no space after "User:" when the turn starts with an image).
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_tokenizer(
    extra_specials: tuple[str, ...], extra_words: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials first (ids 0..), then the built-in world's words.

    Special tokens are matched before pre-tokenization, so "<image><image>" (the processor's
    expansion, written without spaces) becomes two tokens. Decoding joins words with spaces.
    """
    specials = [*BASE_SPECIALS, *extra_specials]
    words = [w for w in [*tiny_vocabulary(), *extra_words] if w not in specials]
    vocab = {tok: i for i, tok in enumerate([*specials, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    return _fast_tokenizer(backend, extra_specials)


def _fast_tokenizer(backend: Tokenizer, extra_specials: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """The transformers wrapper both tiny tokenizers share: specials, right padding, 256 max."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(extra_specials),
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=256,
    )


# Qwen2's pre-tokenizer split (from its tokenizer.json): contractions, letters with at most one
# leading non-letter (" Jorna" is one piece), single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Small enough that names (seen about once in the corpus) are split into 2-6 pieces, large
# enough that the template words ("Ġthe", "Ġperson", "ĠWho", "Where") are single tokens.
TINY_BPE_VOCAB_SIZE = 700
_PLACEHOLDER_RE = re.compile(r"\{\w+\}")


def tiny_bpe_corpus(extra_words: tuple[str, ...] = ()) -> list[str]:
    """The BPE training text: the built-in world's words and sentences, in a fixed order.

    One line of every vocabulary word (and `extra_words`) separated by spaces, then each fact's
    values and questions, the identity questions, the extra prose words and SIU's templates,
    with `{placeholders}` dropped and whitespace collapsed.
    """
    texts = [" ".join([*tiny_vocabulary(), *extra_words])]
    for fact in FACTS:
        texts += [*fact.values, fact.image_question, fact.text_question, fact.cloze]
    texts += [*IDENTITY_QUESTIONS, " ".join(EXTRA_WORDS), *siu_templates.ALL_TEMPLATES]
    lines = [" ".join(_PLACEHOLDER_RE.sub(" ", t).split()) for t in texts]
    return [line for line in lines if line]


def build_tiny_bpe_tokenizer(
    extra_specials: tuple[str, ...],
    extra_words: tuple[str, ...] = (),
    vocab_size: int = TINY_BPE_VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer trained on `tiny_bpe_corpus`: specials first (ids 0..), then bytes.

    Deterministic: the same corpus gives the same vocabulary and merges in every process. Any
    text encodes without unknown tokens and decodes back verbatim (spaces included, so
    `encode_for_loss`'s " " + answer decodes with its leading space). Special tokens are matched
    before pre-tokenization, so "<|image_pad|><|image_pad|>" is two tokens.
    """
    specials = [*BASE_SPECIALS, *extra_specials]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_bpe_corpus(extra_words), trainer=trainer)
    return _fast_tokenizer(backend, extra_specials)


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without a video processor.

    `Qwen2VLProcessor` insists on a `Qwen2VLVideoProcessor`, which needs torchvision (absent on
    CPU installs); the tiny model never sees video. Registered with `AutoProcessor` (under a dummy
    config) so a saved tiny checkpoint reloads through `AutoProcessor.from_pretrained`.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class _TinyQwenProcessorKey(PretrainedConfig):
    """Dummy config: the registry key under which `AutoProcessor` finds `TinyQwen2VLProcessor`."""

    model_type = "dsunlearn_tiny_qwen2_vl_processor"


AutoProcessor.register(_TinyQwenProcessorKey, TinyQwen2VLProcessor, exist_ok=True)


def _llava_processor() -> LlavaProcessor:
    tok = build_tiny_tokenizer((IMAGE,))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def _llava_config(processor: ProcessorMixin) -> LlavaConfig:
    tok = processor.tokenizer
    n_patches = (IMAGE_SIZE // processor.patch_size) ** 2
    return LlavaConfig(
        vision_config=_tiny_clip(IMAGE_SIZE, processor.patch_size),
        text_config=_tiny_llama(tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),  # default 32000 is out of range
        image_seq_length=n_patches,
        vision_feature_layer=-1,  # -2 would leave the tiny tower's last layer without gradients
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


QWEN_PATCH = 4
QWEN_MERGE = 2
QWEN_TEMPORAL = 2


def _qwen_processor() -> TinyQwen2VLProcessor:
    tok = build_tiny_bpe_tokenizer(QWEN_SPECIALS)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels,  # any image is resized to about 32x32 pixels
        max_pixels=pixels,
        patch_size=QWEN_PATCH,
        temporal_patch_size=QWEN_TEMPORAL,
        merge_size=QWEN_MERGE,
    )
    return TinyQwen2VLProcessor(image_processor, tok, chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_config(processor: ProcessorMixin) -> Qwen2VLConfig:
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "attention_dropout": 0.0,
        # head_dim 64 -> 32 rotary frequencies split over (time, height, width)
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [8, 12, 12],
        },
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": 2,
        "embed_dim": 128,
        "hidden_size": 256,  # merger output = text hidden size
        "mlp_ratio": 2,
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": QWEN_PATCH,
        "spatial_merge_size": QWEN_MERGE,
        "temporal_patch_size": QWEN_TEMPORAL,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


# The vision tower size of every ViT-style tiny family (CLIP for the LLaVAs, SigLIP for Idefics3).
_TINY_TOWER: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "attention_dropout": 0.0,
}


def _tiny_clip(image_size: int, patch_size: int) -> CLIPVisionConfig:
    """The 3-layer, 128-wide CLIP tower of tiny-llava and tiny-llava-next."""
    return CLIPVisionConfig(
        **_TINY_TOWER, image_size=image_size, patch_size=patch_size, projection_dim=128
    )


def _tiny_llama(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    """The 4-layer, 256-wide Llama decoder of tiny-llava, tiny-llava-next and tiny-idefics3."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )


LLAVA_NEXT_CROP = 16  # side of the base view and of each grid crop
LLAVA_NEXT_PATCH = 4
LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # a 32x32 image -> 2x2 crops


def _llava_next_processor() -> LlavaNextProcessor:
    tok = build_tiny_tokenizer(LLAVA_NEXT_SPECIALS)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": LLAVA_NEXT_CROP},
        crop_size={"height": LLAVA_NEXT_CROP, "width": LLAVA_NEXT_CROP},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        do_center_crop=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=LLAVA_NEXT_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def _llava_next_config(processor: ProcessorMixin) -> LlavaNextConfig:
    tok = processor.tokenizer
    side = LLAVA_NEXT_CROP // LLAVA_NEXT_PATCH  # 4 patches a side per view
    return LlavaNextConfig(
        vision_config=_tiny_clip(LLAVA_NEXT_CROP, LLAVA_NEXT_PATCH),
        text_config=_tiny_llama(tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),  # default 32000 is out of range
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=side * side + 2 * side * (2 * side + 1),  # 88 for a square image
        vision_feature_layer=-1,  # -2 would leave the tiny tower's last layer without gradients
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


IDEFICS3_TILE = 16  # side of each tile and of the global view
IDEFICS3_PATCH = 4
IDEFICS3_SCALE = 2  # pixel shuffle: 2x2 patches -> one token
IDEFICS3_SEQ_LEN = (IDEFICS3_TILE // IDEFICS3_PATCH) ** 2 // IDEFICS3_SCALE**2  # 4 per view


def _idefics3_processor() -> Idefics3Processor:
    # The same merges as tiny-qwen2-vl's tokenizer: the 40 framing specials come on top.
    extra = len(IDEFICS3_SPECIALS) - len(QWEN_SPECIALS)
    tok = build_tiny_bpe_tokenizer(IDEFICS3_SPECIALS, vocab_size=TINY_BPE_VOCAB_SIZE + extra)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * IDEFICS3_TILE},  # any image -> at most 2x2 tiles
        max_image_size={"longest_edge": IDEFICS3_TILE},
        do_image_splitting=True,
    )
    return Idefics3Processor(
        image_processor,
        tok,
        image_seq_len=IDEFICS3_SEQ_LEN,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )


def _idefics3_config(processor: ProcessorMixin) -> Idefics3Config:
    tok = processor.tokenizer
    vision = Idefics3VisionConfig(
        **_TINY_TOWER, image_size=IDEFICS3_TILE, patch_size=IDEFICS3_PATCH
    )
    return Idefics3Config(
        vision_config=vision,
        text_config=_tiny_llama(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),  # default 128257 is out of range
        scale_factor=IDEFICS3_SCALE,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )


@dataclass(frozen=True)
class TinySpec:
    """How to build one built-in tiny model: its processor and its config from that processor."""

    architecture: str
    processor: Callable[[], ProcessorMixin]
    config: Callable[[ProcessorMixin], PretrainedConfig]


TINY_MODELS: dict[str, TinySpec] = {
    "tiny-llava": TinySpec("LlavaForConditionalGeneration", _llava_processor, _llava_config),
    "tiny-qwen2-vl": TinySpec("Qwen2VLForConditionalGeneration", _qwen_processor, _qwen_config),
    "tiny-llava-next": TinySpec(
        "LlavaNextForConditionalGeneration", _llava_next_processor, _llava_next_config
    ),
    "tiny-idefics3": TinySpec(
        "Idefics3ForConditionalGeneration", _idefics3_processor, _idefics3_config
    ),
}


def _spec(name: str) -> TinySpec:
    if name not in TINY_MODELS:
        raise ModelError(f"unknown tiny model {name!r}; built-in: {', '.join(TINY_MODELS)}")
    return TINY_MODELS[name]


def build_tiny_processor(name: str) -> ProcessorMixin:
    """The processor (tokenizer + image processor + chat template) of a built-in tiny model."""
    return _spec(name).processor()


def build_tiny_config(name: str, processor: ProcessorMixin) -> PretrainedConfig:
    """The model config of a built-in tiny model, with token ids taken from `processor`."""
    return _spec(name).config(processor)
