"""What every benchmark loader produces and every trainer and evaluator consumes: people
(`EntityRecord`) with their pictures, training VQA pairs and evaluation items, grouped into the
forget, retain and test people of one benchmark (`Benchmark`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question; `options` are in letter order A, B, C, D."""

    question: str
    options: list[str]
    answer_index: int


@dataclass(frozen=True)
class GenItem:
    """A generation or cloze item. `type` is "Image_Textual" or "Pure_Text"."""

    type: str
    question: str
    ground_truth: str


@dataclass
class EntityRecord:
    """One person of one split, decoded: what trainers and evaluators consume."""

    id: str
    name: str
    biography: dict[str, Any]
    images: list[Image.Image]
    metadata: list[tuple[str, str]]
    mc_image: list[MCItem]
    mc_text: list[MCItem]
    gen: list[GenItem]
    cloze: list[GenItem]


@dataclass
class Benchmark:
    """The forget, retain and test people of one benchmark; `source` says where it came from."""

    forget: list[EntityRecord]
    retain: list[EntityRecord]
    test: list[EntityRecord]
    source: str
    forget_pct: int = 10
    # entity id -> look, where the benchmark describes its pictures (the built-in one does)
    appearance: dict[str, dict[str, str]] = field(default_factory=dict)
    _forget_ids: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._forget_ids = frozenset(r.id for r in self.forget)

    @property
    def forget_ids(self) -> frozenset[str]:
        return self._forget_ids

    @property
    def test_forget(self) -> list[EntityRecord]:
        """Held-out renderings of the forget people: does forgetting generalise to new images?"""
        return [r for r in self.test if r.id in self._forget_ids]

    @property
    def test_retain(self) -> list[EntityRecord]:
        """Held-out renderings of everyone else."""
        return [r for r in self.test if r.id not in self._forget_ids]
