"""Small POPE and MMBench datasets in their published layouts, for tests and smoke runs.

The pictures are the built-in world's portraits (`faces.render_face`), so the questions are
about what is really drawn: a person, a shirt, a hat or glasses, colours, face shapes, and
(MMBench's celebrity_recognition) the built-in fictitious people by name. Everything is
deterministic in `seed`; each writer replaces its output atomically and records its arguments
(`fixture.json`, which the loaders ignore) so that `ensure_*` reuses a matching one.

    write_pope_fixture("data/pope-fixture", questions_per_file=8)
    write_mmbench_fixture("data/mmbench-fixture/mmbench_dev_en.tsv", questions=12)
"""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dsunlearn.data import faces
from dsunlearn.data.fixtures import fictitious_people
from dsunlearn.data.mmbench import COPY_OFFSET, LETTERS
from dsunlearn.data.pope import SAMPLINGS
from dsunlearn.errors import ConfigError
from dsunlearn.fsutil import atomic_dir, atomic_path, write_json_atomic

UTILITY_FIXTURE_VERSION = 1  # bump whenever the same arguments would give different files
INFO_FILE = "fixture.json"

# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------

# Absent objects by POPE's three samplings: any COCO object (random), the most frequent ones
# (popular), the ones that go with people (adversarial). Accessories not worn come first in the
# last two: they are what a hallucinating model "sees" on a portrait.
RANDOM_OBJECTS = ("dog", "car", "bicycle", "bottle", "chair", "clock", "umbrella", "banana")
POPULAR_OBJECTS = ("chair", "car", "cup", "bottle", "dog", "book")
ADVERSARIAL_OBJECTS = ("tie", "handbag", "backpack", "cell phone", "umbrella")
ACCESSORY_OBJECTS = {"hat": "hat", "glasses": "glasses"}  # faces.ACCESSORIES drawn as objects


def present_objects(identity: faces.Identity) -> list[str]:
    """What a portrait of `identity` shows, as POPE objects."""
    out = ["person", "shirt"]
    if identity.accessory in ACCESSORY_OBJECTS:
        out.append(ACCESSORY_OBJECTS[identity.accessory])
    return out


def _absent(sampling: str, identity: faces.Identity, k: int, rng: np.random.Generator) -> str:
    missing = [a for a in ACCESSORY_OBJECTS.values() if a not in present_objects(identity)]
    if sampling == "random":
        return RANDOM_OBJECTS[int(rng.integers(len(RANDOM_OBJECTS)))]
    pool = [*missing, *(POPULAR_OBJECTS if sampling == "popular" else ADVERSARIAL_OBJECTS)]
    return pool[k % len(pool)]


def _question(obj: str) -> str:
    """POPE's template, "Is there a/an <object> in the image?"."""
    phrase = "pair of glasses" if obj == "glasses" else obj
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"Is there {article} {phrase} in the image?"


def write_pope_fixture(
    out_dir: str | Path,
    *,
    questions_per_file: int = 8,
    images: int = 4,
    seed: int = 0,
    image_size: int = 32,
) -> Path:
    """Write coco_pope_{random,popular,adversarial}.json (JSON lines, POPE's published files)
    and `images/`: `images` portraits, each asked about in turn, one present object ("yes")
    then one absent object ("no") drawn by the file's sampling, until the file holds
    `questions_per_file` (even) questions, half yes, half no, as POPE's."""
    if questions_per_file < 2 or questions_per_file % 2 or images < 1:
        raise ConfigError("write_pope_fixture needs an even questions_per_file >= 2, images >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([UTILITY_FIXTURE_VERSION, seed, 11]))
    identities = faces.choose_identities(images, rng)
    names = [f"fixture_{i + 1:05d}.png" for i in range(images)]
    pictures = [faces.png_bytes(faces.render_face(ident, rng, image_size)) for ident in identities]
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for name, png in zip(names, pictures, strict=True):
            (tmp / "images" / name).write_bytes(png)
        for sampling in SAMPLINGS:
            lines = []
            for k in range(questions_per_file // 2):
                i = k % images
                shown = present_objects(identities[i])
                pair = [
                    (shown[k % len(shown)], "yes"),
                    (_absent(sampling, identities[i], k, rng), "no"),
                ]
                for obj, label in pair:
                    row = {
                        "question_id": len(lines) + 1,
                        "image": names[i],
                        "text": _question(obj),
                        "label": label,
                    }
                    lines.append(json.dumps(row))
            (tmp / f"coco_pope_{sampling}.json").write_text("\n".join(lines) + "\n")
        info = {
            "generator": "dsunlearn-fixture-pope",
            **_pope_params(questions_per_file, images, seed, image_size),
            "pictures": {n: ident.as_dict() for n, ident in zip(names, identities, strict=True)},
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _pope_params(questions_per_file: int, images: int, seed: int, image_size: int) -> dict:
    return {
        "fixture_version": UTILITY_FIXTURE_VERSION,
        "questions_per_file": questions_per_file,
        "images": images,
        "seed": seed,
        "image_size": image_size,
    }


# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------

TSV_COLUMNS = (
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
)
PERCEPTION = "finegrained_perception (instance-level)"
# (category, l2-category, question, hint) per kind; options come from `_mmbench_item`.
KINDS: tuple[tuple[str, str, str, str], ...] = (
    ("attribute_recognition", PERCEPTION, "What colour is the person's shirt?", ""),
    ("attribute_recognition", PERCEPTION, "What colour is the person's hair?", ""),
    ("attribute_recognition", PERCEPTION, "What shape is the person's face?", ""),
    ("attribute_recognition", PERCEPTION, "Is the person wearing glasses?", "Look at the eyes."),
    (
        "celebrity_recognition",
        "coarse_perception",
        "Who is this person?",
        "The picture shows one of the people of the built-in world.",
    ),
)


def _mmbench_item(
    kind: int, person: Any, others: list[str], rng: np.random.Generator
) -> tuple[list[str], int]:
    """The options of question `kind` about `person` (shuffled) and the right one's place."""
    ident = person.identity
    if kind == 0:
        right, pool = ident.shirt, [c for c in faces.SHIRT_COLOURS if c != ident.shirt]
    elif kind == 1:
        right, pool = ident.hair_colour, [c for c in faces.HAIR_COLOURS if c != ident.hair_colour]
    elif kind == 2:  # three options: C used, D empty
        options = list(faces.FACE_SHAPES)
        return options, options.index(ident.face_shape)
    elif kind == 3:  # two options, in their usual order
        return ["Yes", "No"], 0 if ident.accessory == "glasses" else 1
    else:
        right, pool = person.name, [n for n in others if n != person.name]
    wrong = [pool[int(i)] for i in rng.choice(len(pool), size=3, replace=False)]
    options = [right, *wrong]
    order = rng.permutation(len(options))
    shuffled = [options[int(i)] for i in order]
    return shuffled, shuffled.index(right)


def write_mmbench_fixture(
    path: str | Path,
    *,
    questions: int = 10,
    seed: int = 0,
    image_size: int = 32,
    circular_copies: bool = False,
) -> Path:
    """Write an MMBench dev TSV at `path` (MMBench's columns, base64 PNG pictures, unused
    options empty): `questions` questions cycling through `KINDS` (4, 4, 3, 2 and 4 options)
    about the built-in people. `circular_copies`: also VLMEvalKit's pre-rotated copies (index
    + k * 1000000, options rotated, `image` = the original's index). Its arguments go to
    `<path>.json` beside it."""
    if questions < 1:
        raise ConfigError("write_mmbench_fixture needs at least 1 question")
    rng = np.random.default_rng(np.random.SeedSequence([UTILITY_FIXTURE_VERSION, seed, 12]))
    people, _, _ = fictitious_people(max(4, min(questions, 12)), seed)
    names = [p.name for p in people]
    rows: list[dict[str, str]] = []
    copies: list[dict[str, str]] = []
    for i in range(questions):
        person = people[i % len(people)]
        kind = i % len(KINDS)
        category, l2, question, hint = KINDS[kind]
        options, answer = _mmbench_item(kind, person, names, rng)
        png = faces.png_bytes(faces.render_face(person.identity, rng, image_size))
        row = {
            "index": str(i),
            "question": question,
            "hint": hint,
            **{c: (options[j] if j < len(options) else "") for j, c in enumerate("ABCD")},
            "answer": LETTERS[answer],
            "category": category,
            "image": base64.b64encode(png).decode("ascii"),
            "source": "dsunlearn-fixture",
            "l2-category": l2,
            "comment": "",
            "split": "dev",
        }
        rows.append(row)
        for k in range(1, len(options) if circular_copies else 1):
            rotated = options[k:] + options[:k]
            copies.append(
                {
                    **row,
                    "index": str(i + k * COPY_OFFSET),
                    **{c: (rotated[j] if j < len(rotated) else "") for j, c in enumerate("ABCD")},
                    "answer": LETTERS[(answer - k) % len(options)],
                    "image": str(i),
                }
            )
    out = Path(path)
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TSV_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows + copies)
    info = {
        "generator": "dsunlearn-fixture-mmbench",
        **_mmbench_params(questions, seed, image_size, circular_copies),
    }
    write_json_atomic(_mmbench_info(out), info)
    return out


def _mmbench_params(questions: int, seed: int, image_size: int, circular_copies: bool) -> dict:
    return {
        "fixture_version": UTILITY_FIXTURE_VERSION,
        "questions": questions,
        "seed": seed,
        "image_size": image_size,
        "circular_copies": circular_copies,
    }


def _mmbench_info(tsv: Path) -> Path:
    return tsv.with_name(tsv.name + ".json")


# ---------------------------------------------------------------------------------------------
# Reuse
# ---------------------------------------------------------------------------------------------


def _matches(info_file: Path, wanted: dict[str, Any]) -> bool:
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and all(info.get(k) == v for k, v in wanted.items())


def _ensure(
    target: Path, info_file: Path, wanted: dict[str, Any], write: Callable[[], Path]
) -> Path:
    return target if target.exists() and _matches(info_file, wanted) else write()


def ensure_pope_fixture(
    out_dir: str | Path,
    *,
    questions_per_file: int = 8,
    images: int = 4,
    seed: int = 0,
    image_size: int = 32,
) -> Path:
    """`write_pope_fixture` unless `out_dir` already holds one written with these arguments."""
    out = Path(out_dir)
    wanted = _pope_params(questions_per_file, images, seed, image_size)
    return _ensure(
        out,
        out / INFO_FILE,
        wanted,
        lambda: write_pope_fixture(
            out,
            questions_per_file=questions_per_file,
            images=images,
            seed=seed,
            image_size=image_size,
        ),
    )


def ensure_mmbench_fixture(
    path: str | Path,
    *,
    questions: int = 10,
    seed: int = 0,
    image_size: int = 32,
    circular_copies: bool = False,
) -> Path:
    """`write_mmbench_fixture` unless `path` already holds one written with these arguments."""
    out = Path(path)
    wanted = _mmbench_params(questions, seed, image_size, circular_copies)
    return _ensure(
        out,
        _mmbench_info(out),
        wanted,
        lambda: write_mmbench_fixture(
            out,
            questions=questions,
            seed=seed,
            image_size=image_size,
            circular_copies=circular_copies,
        ),
    )
