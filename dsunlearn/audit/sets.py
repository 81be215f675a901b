"""The examples every attack of the audit reads, cut once from the benchmark's test view.

The forget *facts from the picture* (every image question but "who is this?") measure what a
model still knows of a face; the identity question is what relearning trains on, so it is kept
out of what relearning is judged by. Any MLLMU-Bench-shaped benchmark works: the identity item
of a person is the image question whose right option is the person's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsunlearn.config import EvalConfig
from dsunlearn.data.benchmark import Benchmark, EntityRecord
from dsunlearn.data.examples import MCExample, QAExample, mc_vqa_examples, subsample
from dsunlearn.data.vocab import IDENTITY_QUESTION
from dsunlearn.eval.benchmarks.builtin import heldout_mia_sets
from dsunlearn.eval.benchmarks.membership import MiaSets


@dataclass
class AuditSets:
    forget_vqa: list[MCExample]  # forget people's image questions on their training images
    retain_vqa: list[MCExample]  # the same for retain people (utility kept)
    forget_facts: list[MCExample]  # forget_vqa without the identity item (relearning's yardstick)
    forget_heldout_facts: list[MCExample]  # the same questions on their held-out images
    relearn: list[QAExample]  # one training image per forget person, the identity question
    identity_train: list[QAExample]  # every person's training images, for the identity probe
    identity_test: list[QAExample]  # forget people's held-out images, for the identity probe
    identity_retain_test: list[QAExample]  # retain people's held-out images (probe context)
    forget_records: list[EntityRecord]  # rephrased images start from these
    people: list[str]  # every person's id: the probe's classes, in this order
    mia: MiaSets  # members: forget pairs on training pictures; non-members: on held-out ones


def fact_items(records: list[EntityRecord], images: dict[str, list]) -> list[MCExample]:
    """Each record's image questions other than its identity item, on `images[id]` (default:
    the record's own training images)."""
    out = []
    for r in records:
        images_of = images.get(r.id, r.images)
        for m in r.mc_image:
            if m.options[m.answer_index] == r.name:  # the identity item
                continue
            out += [
                MCExample(m.question, list(m.options), m.answer_index, im, r.id) for im in images_of
            ]
    return out


def identity_examples(records: list[EntityRecord], first_only: bool = False) -> list[QAExample]:
    """("Who is this person?", name) on each record's images (the first one only if asked)."""
    return [
        QAExample(IDENTITY_QUESTION, r.name, im, r.id)
        for r in records
        for im in (r.images[:1] if first_only else r.images)
    ]


def build_audit_sets(
    bench: Benchmark, eval_cfg: EvalConfig, retain_max_items: int, seed: int
) -> AuditSets:
    """`bench`: the benchmark's test view (`Benchmark.split("test")`); `eval_cfg.max_items`
    caps each side of the membership inference, as in the benchmark's own protocol."""
    heldout = {r.id: r.images for r in bench.test_forget}
    forget_with_heldout = [r for r in bench.forget if heldout.get(r.id)]
    retain_heldout = {r.id: r.images for r in bench.test_retain}
    retain_test = [
        QAExample(IDENTITY_QUESTION, r.name, im, r.id)
        for r in bench.retain
        for im in retain_heldout.get(r.id, [])
    ]
    forget_test = [
        QAExample(IDENTITY_QUESTION, r.name, im, r.id)
        for r in bench.forget
        for im in heldout.get(r.id, [])
    ]
    return AuditSets(
        forget_vqa=mc_vqa_examples(bench.forget),
        retain_vqa=subsample(mc_vqa_examples(bench.retain), retain_max_items, seed),
        forget_facts=fact_items(bench.forget, {}),
        forget_heldout_facts=fact_items(forget_with_heldout, heldout),
        relearn=identity_examples(bench.forget, first_only=True),
        identity_train=identity_examples(bench.forget + bench.retain),
        identity_test=forget_test,
        identity_retain_test=retain_test,
        forget_records=list(bench.forget),
        people=[r.id for r in bench.forget + bench.retain],
        mia=heldout_mia_sets(bench, eval_cfg, seed),
    )
