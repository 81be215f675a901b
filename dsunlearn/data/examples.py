"""Flatten loaded benchmark records into the examples trainers and evaluators iterate over.

Image questions are paired with every image of a record (training renderings for forget/retain
records, held-out renderings for Test_Set records), so "does the model know this face?" is asked
of each picture, not of one lucky rendering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from dsunlearn.data.benchmark import Benchmark, EntityRecord
from dsunlearn.data.mllmu import TYPE_IMAGE, TYPE_TEXT
from dsunlearn.data.siu import choose_image
from dsunlearn.data.siu_templates import NEW_NAME_QUESTIONS

T = TypeVar("T")


@dataclass(frozen=True)
class QAExample:
    """A question with its target answer; `image=None` for a text-only question."""

    question: str
    answer: str
    image: Image.Image | None
    entity_id: str


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice question; `options[answer_index]` is correct."""

    question: str
    options: list[str]
    answer_index: int
    image: Image.Image | None
    entity_id: str


@dataclass(frozen=True)
class ProbeExample:
    """A "who is this?" question about a picture of a forget entity (SIU's EFF/GEN probes).

    `split` is "train" for the one training image SIU fine-tunes on, "heldout" for a held-out
    image; `name` is the entity's name, which an answer must not contain.
    """

    question: str
    image: Image.Image
    entity_id: str
    name: str
    split: str


@dataclass(frozen=True)
class GenExample:
    """A free-generation question scored against `reference` (ROUGE-L, cloze substring)."""

    question: str
    reference: str
    image: Image.Image | None
    entity_id: str


def vqa_train_examples(records: Iterable[EntityRecord]) -> list[QAExample]:
    """Every training VQA pair (`metadata`) with every image of its person, then each image's
    own pairs (`image_qa[i]` with `images[i]` only: CLEAR's captions describe one picture each,
    so a caption asked of another picture of the person would teach a wrong description)."""
    return [
        QAExample(q, a, image, r.id)
        for r in records
        for i, image in enumerate(r.images)
        for q, a in (*r.metadata, *(r.image_qa[i] if i < len(r.image_qa) else ()))
    ]


def text_qa_examples(records: Iterable[EntityRecord]) -> list[QAExample]:
    """Pure_Text generation items (questions that name the person), without an image."""
    return [
        QAExample(g.question, g.ground_truth, None, r.id)
        for r in records
        for g in r.gen
        if g.type == TYPE_TEXT
    ]


def learn_examples(bench: Benchmark, gold: bool = False) -> list[QAExample]:
    """What `dsunlearn learn` trains on: every person's training VQA pairs with every training
    image, then every person's text QA. The gold model's set (`gold`) keeps all the text QA (the
    forget people's facts stay known by name) and drops every picture of a forget person."""
    people = bench.forget + bench.retain
    pictured = bench.retain if gold else people
    return vqa_train_examples(pictured) + text_qa_examples(people)


def mc_vqa_examples(records: Iterable[EntityRecord]) -> list[MCExample]:
    """Every Image_Textual multiple-choice question with every image of its person."""
    return [
        MCExample(m.question, list(m.options), m.answer_index, image, r.id)
        for r in records
        for image in r.images
        for m in r.mc_image
    ]


def mc_text_examples(records: Iterable[EntityRecord]) -> list[MCExample]:
    """Pure_Text multiple-choice questions, without an image."""
    return [
        MCExample(m.question, list(m.options), m.answer_index, None, r.id)
        for r in records
        for m in r.mc_text
    ]


def gen_examples(records: Iterable[EntityRecord], task_type: str) -> list[GenExample]:
    """Generation_Task items of one type; Image_Textual ones about the record's first image."""
    return [
        GenExample(g.question, g.ground_truth, r.images[0] if g.type == TYPE_IMAGE else None, r.id)
        for r in records
        for g in r.gen
        if g.type == task_type
    ]


def gen_vqa_examples(records: Iterable[EntityRecord]) -> list[GenExample]:
    """Image_Textual generation items, asked about the record's first image."""
    return gen_examples(records, TYPE_IMAGE)


def cloze_examples(
    records: Iterable[EntityRecord], task_type: str | None = None
) -> list[GenExample]:
    """Mask_Task items (of `task_type` only, if given); Image_Textual ones come with the
    record's first image."""
    return [
        GenExample(c.question, c.ground_truth, r.images[0] if c.type == TYPE_IMAGE else None, r.id)
        for r in records
        for c in r.cloze
        if task_type is None or c.type == task_type
    ]


def identity_probe_examples(bench: Benchmark, image_index: int = 0) -> list[ProbeExample]:
    """SIU's identity probes: every forget entity, every "who is this?" paraphrase, asked of the
    training image SIU sees (`choose_image(..., image_index)`) and of each held-out image.

    Order: entity by entity; within one, the train probes, then held-out image by image.
    """
    probes: list[ProbeExample] = []
    for entity in bench.forget:
        heldout = [im for r in bench.test_forget if r.id == entity.id for im in r.images]
        _, train_image = choose_image(entity, heldout, image_index)
        for split, image in [("train", train_image), *(("heldout", im) for im in heldout)]:
            probes += [
                ProbeExample(q, image, entity.id, entity.name, split) for q in NEW_NAME_QUESTIONS
            ]
    return probes


def subsample(items: Sequence[T], max_items: int, seed: int) -> list[T]:
    """At most `max_items` of `items` (0 = all), chosen by `seed`, in their original order.

    Keeping the order keeps per-entity grouping and makes reports easy to diff across runs.
    """
    if max_items <= 0 or len(items) <= max_items:
        return list(items)
    keep = np.random.default_rng(seed).choice(len(items), size=max_items, replace=False)
    return [items[int(i)] for i in np.sort(keep)]
