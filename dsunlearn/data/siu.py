"""SIU's multifaceted fine-tuning data, built from ONE image of each forget entity.

Four targets (Li et al., "Single Image Unlearning", NeurIPS 2024), each with several paraphrases
(`siu_templates.py`):

1. ``new_name``: the image + "who is this?" is answered with a fabricated name (target phrase:
   the name) -- the model should meet the face as a stranger's;
2. ``new_description``: the image + "is <name> in this picture?" is answered "no", with what the
   picture shows and a fabricated look for <name> (target phrase: the whole answer);
3. ``true_facts``: text only, "do you know <name>?" is answered with the true biography, so that
   forgetting the face does not forget the facts (no target phrase);
4. ``other_qa``: other people's text QA, reworded (no target phrase).

The target phrase marks where the trained model is *meant* to disagree with the original: the
Dual Masked KL skips those tokens. The entity's name becomes a set of vocabulary ids that the KL
drops (`name_token_ids`). The chosen image is recorded (`SIUImage`) and is never one of the
entity's held-out evaluation images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from dsunlearn.data import faces
from dsunlearn.data import siu_templates as T
from dsunlearn.data.benchmark import EntityRecord
from dsunlearn.errors import DataError

TARGETS = ("new_name", "new_description", "true_facts", "other_qa")


@dataclass(frozen=True)
class SIUSample:
    """One fine-tuning pair; `target_phrase` (a substring of `answer`) is excluded from the KL."""

    target: str  # one of TARGETS
    question: str
    answer: str
    image: Image.Image | None
    target_phrase: str | None
    entity_id: str


@dataclass(frozen=True)
class SIUImage:
    """Which picture SIU saw, for the report: the entity, its training-image index, a hash."""

    entity_id: str
    name: str
    image_index: int
    sha256: str  # of the RGB pixels, so the picture is identifiable whatever its file name

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class SIUData:
    """Everything SIU fine-tunes on for one forget entity."""

    entity_id: str
    name: str
    new_name: str
    image: SIUImage
    samples: list[SIUSample]


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()[:16]


def choose_image(
    entity: EntityRecord, heldout: Sequence[Image.Image], image_index: int = 0
) -> tuple[int, Image.Image]:
    """The `image_index`-th training image of `entity` that is none of its held-out images.

    Held-out images are compared by pixels, not by position: a benchmark that reuses a test
    photo in its training split must not let SIU train on an image it is evaluated on.
    """
    if not entity.images:
        raise DataError(f"entity {entity.id} ({entity.name}) has no training image for SIU")
    banned = {pixel_hash(im) for im in heldout}
    usable = [(i, im) for i, im in enumerate(entity.images) if pixel_hash(im) not in banned]
    if not usable:
        raise DataError(
            f"every training image of entity {entity.id} ({entity.name}) is also one of its "
            "held-out images; SIU needs an image it is not evaluated on"
        )
    if not 0 <= image_index < len(usable):
        raise DataError(
            f"siu image index {image_index} is out of range: entity {entity.id} has "
            f"{len(usable)} usable training images"
        )
    return usable[image_index]


def fabricate_name(taken: Iterable[str], rng: np.random.Generator) -> str:
    """A full name from the fabricated pools that is nobody's name and shares no word with one."""
    taken_words = {w for name in taken for w in name.split()}
    firsts = [f for f in T.FABRICATED_FIRST_NAMES if f not in taken_words]
    lasts = [la for la in T.FABRICATED_LAST_NAMES if la not in taken_words]
    if not firsts or not lasts:
        raise DataError("no fabricated name is left that differs from every benchmark name")
    return f"{firsts[rng.integers(len(firsts))]} {lasts[rng.integers(len(lasts))]}"


def describe(appearance: dict[str, str] | None) -> str:
    """A short appearance phrase from the built-in generator's attributes (see `faces.py`)."""
    if not appearance:
        return T.UNKNOWN_APPEARANCE
    a = dict(appearance)
    return T.APPEARANCE.format(
        skin=a["skin"],
        hair_colour=a["hair_colour"],
        hair_style=T.HAIR_STYLE_WORDS[a["hair_style"]],
        eye_colour=a["eye_colour"],
        face_shape=a["face_shape"],
        shirt=a["shirt"],
        accessory=T.ACCESSORY_WORDS[a["accessory"]],
    )


def fabricate_appearance(
    appearance: dict[str, str] | None, rng: np.random.Generator
) -> dict[str, str]:
    """A look that differs from `appearance` in every attribute (any look if it is unknown)."""
    pools = {
        "skin": list(faces.SKIN_TONES),
        "hair_colour": list(faces.HAIR_COLOURS),
        "hair_style": list(faces.HAIR_STYLES),
        "eye_colour": list(faces.EYE_COLOURS),
        "shirt": list(faces.SHIRT_COLOURS),
        "face_shape": list(faces.FACE_SHAPES),
        "accessory": list(faces.ACCESSORIES),
    }
    seen = appearance or {}
    out = {}
    for key, pool in pools.items():
        choices = [v for v in pool if v != seen.get(key)]
        out[key] = choices[rng.integers(len(choices))]
    return out


def _facts_sentence(entity: EntityRecord) -> str:
    parts = [
        T.FACT_SENTENCE.format(name=entity.name, key=key.lower(), value=value)
        for key, value in entity.biography.items()
        if key.lower() != "name" and isinstance(value, str | int | float)
    ]
    if not parts:
        raise DataError(f"entity {entity.id} ({entity.name}) has no biography facts for SIU")
    return " ".join(parts)


def _other_qa(others: Sequence[EntityRecord], n: int, rng: np.random.Generator) -> list[tuple]:
    """(question, answer) text pairs of other entities: the correct options of their text MC."""
    pairs = [(mc.question, mc.options[mc.answer_index]) for r in others for mc in r.mc_text]
    if not pairs:
        return []
    idx = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
    return [pairs[int(i)] for i in sorted(idx)]


def build_siu_data(
    entity: EntityRecord,
    others: Sequence[EntityRecord],
    *,
    heldout: Sequence[Image.Image] = (),
    taken_names: Iterable[str] = (),
    appearance: dict[str, str] | None = None,
    image_index: int = 0,
    other_qa: int = 8,
    seed: int = 0,
) -> SIUData:
    """SIU's samples for one forget entity from one of its training images.

    `others` are entities to keep (target 4 draws their text QA); `heldout` are the entity's
    evaluation images (never used); `taken_names` are every name of the benchmark, which the
    fabricated name must avoid; `appearance` is the entity's look if the benchmark knows it.
    """
    rng = np.random.default_rng([seed, int(hashlib.sha256(entity.id.encode()).hexdigest()[:8], 16)])
    idx, image = choose_image(entity, heldout, image_index)
    new_name = fabricate_name([entity.name, *taken_names], rng)
    seen = describe(appearance)
    samples: list[SIUSample] = []

    for q, a in zip(T.NEW_NAME_QUESTIONS, T.NEW_NAME_ANSWERS, strict=True):
        answer = a.format(new_name=new_name)
        samples.append(SIUSample("new_name", q, answer, image, new_name, entity.id))

    for q, a in zip(T.DESCRIPTION_QUESTIONS, T.DESCRIPTION_ANSWERS, strict=True):
        other = describe(fabricate_appearance(appearance, rng))
        answer = a.format(name=entity.name, seen=seen, other=other)
        question = q.format(name=entity.name)
        samples.append(SIUSample("new_description", question, answer, image, answer, entity.id))

    facts = _facts_sentence(entity)
    for q, opening in zip(T.FACT_QUESTIONS, T.FACT_OPENINGS, strict=True):
        answer = opening.format(name=entity.name, facts=facts)
        samples.append(
            SIUSample("true_facts", q.format(name=entity.name), answer, None, None, entity.id)
        )

    pairs = _other_qa(others, other_qa, rng)
    for k, (q, a) in enumerate(pairs):
        wrapper = T.OTHER_QA_QUESTIONS[k % len(T.OTHER_QA_QUESTIONS)]
        samples.append(SIUSample("other_qa", wrapper.format(question=q), a, None, None, entity.id))

    record = SIUImage(entity.id, entity.name, idx, pixel_hash(image))
    return SIUData(entity.id, entity.name, new_name, record, samples)


def name_token_ids(tokenizer, name: str) -> list[int]:
    """Every vocabulary id the name can be written with: the vocabulary-level mask of the KL.

    Subword tokenizers spell a word differently at the start of a text than after a space
    ("Jorna" vs " Jorna"), so the full name and each of its words are tokenised both ways.
    Special tokens are never included.
    """
    variants = {name, " " + name}
    for word in name.split():
        variants.update((word, " " + word))
    ids: set[int] = set()
    for text in sorted(variants):
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise DataError(f"the tokenizer does not know the name {name!r} (it maps to UNK)")
    ids -= set(tokenizer.all_special_ids)
    if not ids:
        raise DataError(f"the name {name!r} tokenises to no ordinary token")
    return sorted(ids)
