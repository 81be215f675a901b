"""The saliency pass as one call: score the engine's current weights, then build the mask.

Used by `dsunlearn saliency` (which saves the mask) and by the `mmunlearner` method (which
scores its own freshly loaded vanilla engine before the first step). No optimizer step is taken
and the gradients are cleared afterwards, so the engine is left as it was found.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsunlearn.config import MaskConfig, SaliencyConfig
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.data.examples import text_qa_examples, vqa_train_examples
from dsunlearn.engine.batches import to_device
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.models.encode import encode_examples, hf_model
from dsunlearn.models.families import strip_wrappers
from dsunlearn.models.lm_head import HeldHead, mean_ce
from dsunlearn.models.loader import block_linears, module_group
from dsunlearn.saliency.mask import build_masks, check_spec
from dsunlearn.saliency.scores import Scores, accumulate_units, real_element_count


@dataclass
class SaliencyResult:
    masks: dict[str, torch.Tensor]  # parameter name -> bool mask of this rank's partition
    threshold: float
    units: dict[str, int]  # complete units scored per loader
    score_bytes: int  # F_forget + F_preserve on this rank: 2 x the fp32 partition
    arch: str
    named: list[tuple[str, torch.nn.Parameter]]


# What peft puts below an adapted module: the wrapped Linear and each adapter's A and B Linears.
_PEFT_SUBMODULE = re.compile(r"\.(?:base_layer|lora_[AB]\.[^.]+)$")


def own_module(name: str) -> str:
    """The model's own module a (possibly wrapped) module name stands for: wrapper prefixes and
    peft's sub-modules stripped (`base_model.model.X.lora_A.default` -> `X`)."""
    return _PEFT_SUBMODULE.sub("", strip_wrappers(name))


def own_param_name(name: str) -> str:
    """The model's own parameter a trainable parameter belongs to: a LoRA matrix
    (`base_model.model.X.lora_B.default.weight`) stands for the weight of the Linear `X` it
    adapts (`X.weight`); any other name loses only its wrapper prefixes."""
    module, _, leaf = strip_wrappers(name).rpartition(".")
    return f"{own_module(module)}.{leaf}" if module else leaf


def mask_filter(model: Any, spec: MaskConfig) -> Callable[[str], bool]:
    """The module filter of `spec` (vision / language / both, Linear weights only or not) as a
    predicate on the trainable parameters' names of `model` (an engine, a peft model or a
    transformers model). Under LoRA the trainable parameters are the adapters: each is judged
    as the Linear it adapts, so `...q_proj.lora_A.default.weight` is a language block Linear."""
    hf = hf_model(model)
    arch = type(hf).__name__
    # The paper masks the blocks' Linear weights (proj/fc/mlp/qkv), never the output head.
    linear_weights = {f"{own_module(name)}.weight" for name in block_linears(hf)}

    def selected(name: str) -> bool:
        own = own_param_name(name)
        group = module_group(arch, own)
        if spec.modules == "vision" and group == "language":
            return False
        if spec.modules == "language" and group != "language":
            return False
        return not spec.linear_only or own in linear_weights

    return selected


def describe_filter(spec: MaskConfig) -> str:
    return f"mask.modules={spec.modules}, mask.linear_only={str(spec.linear_only).lower()}"


def check_filter_admits(names: Sequence[str], selected: Callable[[str], bool], spec) -> None:
    """One line, not a silently empty mask, when the filter admits no trainable parameter."""
    if any(selected(n) for n in names):
        return
    lora = any(".lora_" in n for n in names)
    why = " (LoRA adapts the language model's Linears only)" if lora else ""
    raise ConfigError(
        f"the saliency filter {describe_filter(spec)} admits none of the {len(names)} "
        f"trainable parameters{why}: nothing could be unlearned"
    )


def check_saliency(cfg: SaliencyConfig, world: int) -> None:
    if cfg.micro_batches < 1 or cfg.unit_batch % cfg.micro_batches:
        raise ConfigError(
            f"unit_batch {cfg.unit_batch} must split into {cfg.micro_batches} micro-batches"
        )
    if cfg.micro_batches % world:
        raise ConfigError(
            f"micro_batches {cfg.micro_batches} must be a multiple of the world size {world}"
        )
    check_spec(cfg.mask)


def _units(
    examples: Sequence[Any], cfg: SaliencyConfig, rank: int, world: int
) -> Iterator[list[list[Any]]]:
    """This rank's micro-batches of each complete unit, in data order (no shuffling)."""
    per_micro = cfg.unit_batch // cfg.micro_batches
    mine = cfg.micro_batches // world
    n_units = len(examples) // cfg.unit_batch
    if cfg.max_units:
        n_units = min(n_units, cfg.max_units)
    for u in range(n_units):
        unit = examples[u * cfg.unit_batch : (u + 1) * cfg.unit_batch]
        micros = [unit[i * per_micro : (i + 1) * per_micro] for i in range(cfg.micro_batches)]
        yield micros[rank * mine : (rank + 1) * mine]


def compute_saliency(
    engine: Any, processor: Any, bench: Benchmark, cfg: SaliencyConfig, info: DistInfo
) -> SaliencyResult:
    """F_forget over the forget VQA; F_preserve over the retain VQA (every module) plus the text
    QA of all entities (language model only), as MMUnlearner does, each the mean of g^2 over
    its units; then the mask."""
    check_saliency(cfg, info.world_size)
    arch = type(hf_model(engine)).__name__
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]

    head = HeldHead()  # gathered by each micro-batch's loss, released after its backward

    def loss_fn(eng: Any, examples: list[Any]) -> torch.Tensor:
        batch = to_device(encode_examples(processor, examples), info.device)
        return mean_ce(eng, batch, head)  # the batch mean of the per-example CE

    def language(name: str) -> bool:
        return module_group(arch, own_param_name(name)) == "language"

    selected = mask_filter(engine, cfg.mask)
    check_filter_admits([n for n, _ in named], selected, cfg.mask)  # before any scoring
    scores = Scores.zeros(named, info.device)

    forget = vqa_train_examples(bench.forget)
    if len(forget) < cfg.unit_batch:
        raise DataError(f"{len(forget)} forget examples: fewer than one unit of {cfg.unit_batch}")
    rank, world = info.rank, info.world_size
    retain = vqa_train_examples(bench.retain)
    texts = text_qa_examples([*bench.forget, *bench.retain])
    units = {
        "forget": accumulate_units(
            engine, named, scores.forget, _units(forget, cfg, rank, world), loss_fn, head.release
        ),
        "retain_vqa": accumulate_units(
            engine, named, scores.preserve, _units(retain, cfg, rank, world), loss_fn, head.release
        ),
        "text_qa": accumulate_units(
            engine,
            named,
            scores.preserve,
            _units(texts, cfg, rank, world),
            loss_fn,
            head.release,
            language,
        ),
    }

    # F is a mean over its loader's units (the paper's definition), so that tau = 1 weighs a
    # forget batch against a preserve batch whatever the sizes of the two sets. The language
    # model's preserve set is the retain VQA plus the text QA; the other modules', the VQA only.
    for name, _ in named:
        scores.forget[name].div_(max(1, units["forget"]))
        n_preserve = units["retain_vqa"] + (units["text_qa"] if language(name) else 0)
        scores.preserve[name].div_(max(1, n_preserve))

    real = {n: real_element_count(p, rank) for n, p in named}
    masks, threshold = build_masks(
        scores.forget, scores.preserve, real, selected, cfg.mask, info.device
    )
    return SaliencyResult(masks, threshold, units, scores.nbytes(), arch, named)
