"""The interface every unlearning method implements, and the shared loss pieces.

A method turns a forget batch (and, if it wants them, a retain batch and the frozen reference
model) into losses. The losses go through the fused `lm_head` ops (`models.lm_head`: no
[B, T, V] logits); the full-logits formulas below (`example_ce`, `example_kl`,
`example_nll_sum`) are their references, kept for tests and debugging. The recipe owns the loop: one optimizer step on `forget_loss`, then, for
methods with `uses_retain`, a separate optimizer step on `retain_loss`, as in the papers.

Losses are per-example means averaged over the batch, so a global batch split over N ranks
gives the same gradient as the whole batch on one rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dsunlearn.config import MethodConfig, OptimConfig
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.errors import MethodError
from dsunlearn.models.encode import logits_of, sequence_logprob_sum, sequence_nll
from dsunlearn.models.lm_head import HeldHead

Batch = dict[str, torch.Tensor]
METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise RuntimeError(f"method '{name}' registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def build_method(name: str, cfg: MethodConfig) -> Method:
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise MethodError(f"unknown method '{name}' (known: {known})")
    return METHODS[name](cfg)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: (logits[:, :-1], labels[:, 1:])."""
    return logits[:, :-1, :], labels[:, 1:]


def example_kl(
    ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """KL(p_ref || p_theta) per answer token, averaged per example: [B]."""
    lg, tgt = _shifted(logits, labels)
    rlg, _ = _shifted(ref_logits, labels)
    mask = tgt != -100
    logq = F.log_softmax(lg, dim=-1)
    logp = F.log_softmax(rlg, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return kl.sum(1) / mask.sum(1).clamp(min=1)


def example_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of each example's answer: [B]."""
    return sequence_nll(logits, labels)


def example_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each example's whole answer: [B]."""
    return -sequence_logprob_sum(logits, labels)


@dataclass
class RunContext:
    """What a method may look at when it is attached to its engine (before the first step)."""

    bench: Benchmark
    processor: Any
    info: Any  # engine.dist.DistInfo
    run_dir: Path
    resume_dir: Path | None = None  # the checkpoint this run continues from, if any


class Method:
    """Base class. Subclasses set the class flags and implement the losses they use."""

    name: ClassVar[str] = ""
    uses_retain: ClassVar[bool] = False  # take a retain step after every forget step
    uses_reference: ClassVar[bool] = False  # needs the frozen vanilla model
    trains: ClassVar[bool] = True  # False: `attach` does all the unlearning (MANU prunes)
    supports_lora: ClassVar[bool] = True  # False: it changes chosen weights of the model itself

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.head = HeldHead()  # the trained lm_head, gathered from a loss until its step

    def forget_examples(self, bench: Benchmark, processor: Any) -> list[Any]:
        """What the forget step trains on: by default every forget VQA pair with every image."""
        return vqa_train_examples(bench.forget)

    def views(self, examples: list[Any], rng: np.random.Generator) -> list[Any]:
        """The examples of one step as the model sees them (SIU shows fresh views of its one
        image); by default unchanged."""
        return examples

    def optim(self, optim: OptimConfig) -> OptimConfig:
        """The optimiser settings of this method's run (a method with paper defaults overrides)."""
        return optim

    def prepare_model(self, model: Any) -> None:
        """Called on the loaded model before its engine is built: a method that trains only
        some weights (RMU) freezes the rest here, so the optimizer never holds them."""

    def attach(self, engine: Any, ctx: RunContext) -> None:
        """Called once the training engine holds the vanilla weights, before the first step
        (MMUnlearner scores them there and builds its mask)."""

    def retain_steps_per_forget(self, n_forget: int, n_retain: int) -> int:
        """How many retain steps follow each forget step (methods with `uses_retain`)."""
        return 1

    def before_step(self, engine: Any, phase: str = "forget") -> None:
        """Called after each backward, before the optimizer step; `phase` is "forget" or
        "retain". Releases the lm_head the fused loss kept gathered for its backward; a
        subclass that overrides this calls it first."""
        self.head.release()

    def save(self, folder: Path, rank: int) -> None:
        """Write what a checkpoint of this method needs besides the engine state (read back in
        `attach` from `ctx.resume_dir` when a run resumes)."""

    def report_info(self) -> dict[str, Any]:
        """Facts about the run worth keeping in the report (e.g. which image SIU saw)."""
        return {}

    def forget_loss(self, model: Callable[..., Any], batch: Batch, ref: Any | None) -> torch.Tensor:
        raise NotImplementedError

    def retain_loss(self, model: Callable[..., Any], batch: Batch, ref: Any | None) -> torch.Tensor:
        raise NotImplementedError(f"method '{self.name}' takes no retain step")

    @staticmethod
    def require_reference(ref: Any | None) -> Any:
        if ref is None:
            raise MethodError("this method needs the frozen reference model")
        return ref

    @classmethod
    def reference_logits(cls, ref: Any, batch: Batch) -> torch.Tensor:
        """Full logits of the reference (eager paths and tests only)."""
        cls.require_reference(ref)
        with torch.no_grad():
            return logits_of(ref, batch)
