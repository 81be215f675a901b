"""What every benchmark loader produces and every trainer and evaluator consumes: people
(`EntityRecord`) with their pictures, training VQA pairs and evaluation items, grouped into the
forget, retain and test people of one benchmark (`Benchmark`).

Model selection reads `Benchmark.split("val")`; the report reads `Benchmark.split("test")`; the
two never share an evaluation item. `Benchmark.split_rule` says in words how they were cut:

- With held-out validation rows (the built-in benchmark's `Val_Set/`: other pictures of every
  person, multiple-choice items with their own distractors and order): "val" is those rows of
  the forget and retain people, "test" is the benchmark as loaded (forget, retain, Test_Set).
- Without them (the real MLLMU-Bench): a seeded hash over the evaluation items. An item of
  record `r` in task T (`mc_image`, `mc_text`, `gen`, `cloze`) is a validation item iff
  `int(sha256(f"{seed}|{r.id}|{T}|{question}").hexdigest()[:8], 16) % 100 < val_pct`
  (`in_val`). The key holds no split name, so the same person and question in the forget rows,
  Test_Set and any other list land on the same side; `split_records` applies it to any list (the
  celebrities of `Retain_Set/` included). Training data (`metadata`, `images`) is never cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from dsunlearn.errors import DataError

SPLITS = ("val", "test")
ITEM_TASKS = ("mc_image", "mc_text", "gen", "cloze")  # the EntityRecord fields the hash cuts


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
    # Per-picture training pairs: image_qa[i] goes with images[i] only (CLEAR: each picture with
    # its own caption), where `metadata` goes with every picture. [] for MLLMU-Bench's layout.
    image_qa: list[list[tuple[str, str]]] = field(default_factory=list)


@dataclass
class Benchmark:
    """The forget, retain and test people of one benchmark; `source` says where it came from.

    `val` holds the benchmark's own validation rows (built-in `Val_Set/`), read from the folder
    `val_folder`; [] when it has none, and then `split` cuts items by the seeded hash
    (`val_pct`, `split_seed`). `view` is "" as loaded, "val" or "test" for a `split` result.
    """

    forget: list[EntityRecord]
    retain: list[EntityRecord]
    test: list[EntityRecord]
    source: str
    forget_pct: int = 10
    # entity id -> look, where the benchmark describes its pictures (the built-in one does)
    appearance: dict[str, dict[str, str]] = field(default_factory=dict)
    val: list[EntityRecord] = field(default_factory=list)
    val_folder: str = ""
    val_pct: int = 20
    split_seed: int = 0
    view: str = ""
    _forget_ids: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._forget_ids = frozenset(r.id for r in self.forget)
        if self.val:  # a validation view must cover every person it evaluates
            val_ids = {r.id for r in self.val}
            missing = [r.id for r in (*self.forget, *self.retain) if r.id not in val_ids]
            if missing:
                raise DataError(
                    f"{self.source}: {self.val_folder or 'the validation rows'} lacks "
                    f"people {missing[:5]}"
                )

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

    @property
    def split_rule(self) -> str:
        """How `split` separates validation from test, in words, for the report."""
        if not self.val:
            return hash_rule(self.val_pct, self.split_seed)
        counts = sorted({len(r.images) for r in self.val})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return (
            f"{self.val_folder}/: {n} held-out pictures of every person, apart from its "
            "training and test pictures, with its own multiple-choice distractors and order"
        )

    def split(self, name: str) -> Benchmark:
        """The evaluation view of split `name` ("val" or "test"): a new Benchmark with `view` =
        `name` and new lists; this one is left as it is. A view asked for its own split gives a
        copy, for the other one a DataError (it holds none of it)."""
        check_split(name)
        if self.view and self.view != name:
            raise DataError(f"this benchmark is already the '{self.view}' split, not '{name}'")
        if self.view or (self.val and name == "test"):
            lists = {k: list(getattr(self, k)) for k in ("forget", "retain", "test")}
        elif self.val:
            by_id = {r.id: r for r in self.val}
            lists = {
                "forget": [by_id[r.id] for r in self.forget],
                "retain": [by_id[r.id] for r in self.retain],
                "test": [],
            }
        else:
            lists = {
                k: split_records(getattr(self, k), name, self.val_pct, self.split_seed)
                for k in ("forget", "retain", "test")
            }
        return dataclasses.replace(
            self, **lists, appearance=dict(self.appearance), val=list(self.val), view=name
        )


def hash_rule(val_pct: int, seed: int) -> str:
    """`in_val` in words, for the report."""
    return (
        f"hash: int(sha256('{seed}|ID|task|question')[:8 hex], 16) % 100 < {val_pct} -> "
        f"validation (about {val_pct}% of the evaluation items), the rest -> test"
    )


def check_split(name: str) -> None:
    """ "val" or "test", or one DataError line."""
    if name not in SPLITS:
        raise DataError(f"unknown evaluation split '{name}' (one of: {', '.join(SPLITS)})")


def check_val_pct(val_pct: int) -> None:
    """A validation share that leaves both sides non-empty, or one DataError line."""
    if not 0 < val_pct < 100:
        raise DataError(f"val_pct must be between 1 and 99, got {val_pct}")


def in_val(record_id: str, task: str, question: str, val_pct: int, seed: int) -> bool:
    """Whether one evaluation item is a validation item (the rule of the module docstring)."""
    key = f"{seed}|{record_id}|{task}|{question}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) % 100 < val_pct


def split_records(
    records: list[EntityRecord], split: str, val_pct: int, seed: int
) -> list[EntityRecord]:
    """Every record with only its `split` items ("val" or "test"), in their order; pictures and
    training pairs untouched. The two calls partition each record's items."""
    check_split(split)
    check_val_pct(val_pct)
    want = split == "val"
    return [
        dataclasses.replace(
            r,
            **{
                task: [
                    item
                    for item in getattr(r, task)
                    if in_val(r.id, task, item.question, val_pct, seed) == want
                ]
                for task in ITEM_TASKS
            },
        )
        for r in records
    ]
