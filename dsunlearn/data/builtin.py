"""The built-in benchmark: fictitious people in MLLMU-Bench's exact layout and schema.

Everything comes from the closed world of `vocab.py` (names, fact pools, question templates), so
the tiny models' word-level tokenizers cover every word, and from `faces.py` (portraits). The
same arguments give byte-identical files, which lets runs cache and compare benchmarks by hash.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsunlearn.data import faces
from dsunlearn.data.mllmu import (
    FULL_DIR,
    MC_LETTERS,
    PARQUET_NAME,
    SCHEMA,
    TEST_DIR,
    TYPE_IMAGE,
    TYPE_TEXT,
    VAL_DIR,
    forget_dir,
    retain_dir,
)
from dsunlearn.data.vocab import (
    FACTS,
    FIRST_NAMES,
    IDENTITY_QUESTION,
    IDENTITY_QUESTIONS,
    IMAGE_SUBJECT,
    LAST_NAMES,
)
from dsunlearn.errors import ConfigError
from dsunlearn.fsutil import atomic_dir

GENERATOR = "dsunlearn-builtin"
GENERATOR_VERSION = 2  # bump whenever the same seed would give different files
MAX_ENTITIES = min(len(FIRST_NAMES), len(LAST_NAMES))


@dataclass
class _Person:
    id: str
    name: str
    facts: dict[str, str]  # fact key -> value
    identity: faces.Identity
    train_png: list[bytes]
    heldout_png: list[bytes]
    val_png: list[bytes]


def build_benchmark(
    out_dir: str | Path,
    *,
    seed: int = 0,
    entities: int = 20,
    forget_pct: int = 10,
    train_images: int = 6,
    heldout_images: int = 2,
    val_images: int = 2,
    image_size: int = 32,
) -> Path:
    """Write the built-in benchmark to `out_dir` (replacing it atomically) and return the path.

    Forget = the first round(entities * forget_pct / 100) people (at least 1, and at least 1
    left to retain) after a seeded shuffle; retain = the others. Full_Set, Test_Set and Val_Set
    hold everyone, with training, held-out and validation renderings respectively.

    Val_Set is what model selection may read while Test_Set stays unseen: `val_images` further
    renderings per person (byte-distinct from the person's training and Test_Set ones) and
    multiple-choice items with their own distractors and order. It draws from two streams of its
    own, so the other four splits keep the bytes they had before Val_Set existed (the shipped
    vanilla models were trained on them).
    """
    _check_args(entities, forget_pct, train_images, heldout_images, val_images, image_size)
    # spawn() keys each child by its index, so the first six are the streams of the original
    # four splits however many follow; the last two serve Val_Set only.
    streams = np.random.SeedSequence([GENERATOR_VERSION, seed]).spawn(8)
    (
        rng_names,
        rng_facts,
        rng_faces,
        rng_split,
        rng_mc,
        rng_images,
        rng_val_mc,
        rng_val_images,
    ) = (np.random.default_rng(s) for s in streams)

    first = rng_names.permutation(len(FIRST_NAMES))[:entities]
    last = rng_names.permutation(len(LAST_NAMES))[:entities]
    names = [f"{FIRST_NAMES[f]} {LAST_NAMES[la]}" for f, la in zip(first, last, strict=True)]
    # Names nobody has: MC distractors when there are fewer than 4 people.
    used_first, used_last = {int(f) for f in first}, {int(la) for la in last}
    spare = [
        f"{FIRST_NAMES[f]} {LAST_NAMES[la]}"
        for f, la in zip(
            (f for f in range(len(FIRST_NAMES)) if f not in used_first),
            (la for la in range(len(LAST_NAMES)) if la not in used_last),
            strict=False,  # as many as the shorter pool allows
        )
    ]
    values = {fact.key: _balanced(fact.values, entities, rng_facts) for fact in FACTS}
    identities = faces.choose_identities(entities, rng_faces)
    image_rngs = _per_person(rng_images, entities)
    val_rngs = _per_person(rng_val_images, entities)

    people = []
    for i in range(entities):
        renders = [
            _render(identities[i], image_rngs[i], image_size)
            for _ in range(train_images + heldout_images)
        ]
        people.append(
            _Person(
                id=f"P{i + 1:03d}",
                name=names[i],
                facts={k: v[i] for k, v in values.items()},
                identity=identities[i],
                train_png=renders[:train_images],
                heldout_png=renders[train_images:],
                val_png=_new_renders(
                    identities[i], val_rngs[i], val_images, image_size, taken=set(renders)
                ),
            )
        )

    n_forget = min(entities - 1, max(1, round(entities * forget_pct / 100)))
    order = rng_split.permutation(entities)
    forget_idx = sorted(int(i) for i in order[:n_forget])
    retain_idx = sorted(int(i) for i in order[n_forget:])

    tasks = [_tasks(p, names, spare, rng_mc) for p in people]
    val_tasks = [
        {**t, "Classification_Task": _classification(p, names, spare, rng_val_mc, avoid=t)}
        for p, t in zip(people, tasks, strict=True)
    ]
    train_rows = [_row(p, t, p.train_png, "train") for p, t in zip(people, tasks, strict=True)]
    test_rows = [_row(p, t, p.heldout_png, "test") for p, t in zip(people, tasks, strict=True)]
    val_rows = [_row(p, t, p.val_png, "val") for p, t in zip(people, val_tasks, strict=True)]

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a benchmark folder is for everyone
        _write_split(tmp / forget_dir(forget_pct), [train_rows[i] for i in forget_idx])
        _write_split(tmp / retain_dir(forget_pct), [train_rows[i] for i in retain_idx])
        _write_split(tmp / FULL_DIR, train_rows)
        _write_split(tmp / TEST_DIR, test_rows)
        _write_split(tmp / VAL_DIR, val_rows)
        info = {
            **_params(
                seed, entities, forget_pct, train_images, heldout_images, val_images, image_size
            ),
            "splits": {
                "forget": forget_dir(forget_pct),
                "retain": retain_dir(forget_pct),
                "full": FULL_DIR,
                "test": TEST_DIR,
                "val": VAL_DIR,
            },
            "forget_ids": [people[i].id for i in forget_idx],
            "retain_ids": [people[i].id for i in retain_idx],
            "people": {p.id: {"name": p.name, "identity": p.identity.as_dict()} for p in people},
        }
        (tmp / "benchmark.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def ensure_benchmark(out_dir: str | Path, **kwargs: Any) -> Path:
    """Build the benchmark unless `out_dir` already holds one made with the same arguments."""
    out = Path(out_dir)
    try:
        info = json.loads((out / "benchmark.json").read_text())
    except (OSError, ValueError):
        info = None
    defaults = {
        name: p.default
        for name, p in inspect.signature(build_benchmark).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    wanted = _params(**{**defaults, **kwargs})
    if isinstance(info, dict) and all(info.get(k) == v for k, v in wanted.items()):
        return out
    return build_benchmark(out, **kwargs)


def _params(
    seed: int,
    entities: int,
    forget_pct: int,
    train_images: int,
    heldout_images: int,
    val_images: int,
    image_size: int,
) -> dict[str, Any]:
    """The generator settings that `benchmark.json` records and `ensure_benchmark` compares (a
    folder from before Val_Set lacks `val_images`, so it is rebuilt)."""
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "entities": entities,
        "forget_pct": forget_pct,
        "train_images": train_images,
        "heldout_images": heldout_images,
        "val_images": val_images,
        "image_size": image_size,
    }


def _check_args(
    entities: int,
    forget_pct: int,
    train_images: int,
    heldout_images: int,
    val_images: int,
    image_size: int,
) -> None:
    if not 2 <= entities <= MAX_ENTITIES:
        raise ConfigError(f"data.entities must be between 2 and {MAX_ENTITIES}, got {entities}")
    if not 0 < forget_pct < 100:
        raise ConfigError(f"data.forget_pct must be between 1 and 99, got {forget_pct}")
    if train_images < 1 or heldout_images < 1 or val_images < 1:
        raise ConfigError(
            "the built-in benchmark needs at least 1 training, 1 held-out and 1 validation image"
        )
    if image_size < 16:
        raise ConfigError(f"image_size must be at least 16, got {image_size}")


def _balanced(pool: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    """`n` values from `pool`, each used at most ceil(n / len(pool)) times, in random order."""
    rounds = math.ceil(n / len(pool))
    seq = [pool[j] for _ in range(rounds) for j in rng.permutation(len(pool))]
    return seq[:n]


def _per_person(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """`n` independent streams, one per person, seeded by one draw of `rng`."""
    root = np.random.SeedSequence(int(rng.integers(2**63)))
    return [np.random.default_rng(s) for s in root.spawn(n)]


def _render(identity: faces.Identity, rng: np.random.Generator, size: int) -> bytes:
    """One new rendering of `identity`, as PNG bytes."""
    return faces.png_bytes(faces.render_face(identity, rng, size))


def _new_renders(
    identity: faces.Identity, rng: np.random.Generator, n: int, size: int, taken: set[bytes]
) -> list[bytes]:
    """`n` renderings whose bytes are neither in `taken` nor repeated: a picture the model
    trained on, or one Test_Set shows, must not pass for a validation picture."""
    seen, out = set(taken), []
    while len(out) < n:
        png = _render(identity, rng, size)
        if png not in seen:
            seen.add(png)
            out.append(png)
    return out


def _mc(
    question: str,
    correct: str,
    pool: list[str],
    rng: np.random.Generator,
    avoid: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A 4-option question: `correct` plus 3 distinct distractors from `pool`, shuffled; drawn
    again while it equals `avoid` (a validation item must not repeat its test twin)."""
    others = sorted({v for v in pool if v != correct})
    while True:
        picked = [others[int(j)] for j in rng.choice(len(others), size=3, replace=False)]
        options = [correct, *picked]
        perm = [int(j) for j in rng.permutation(4)]
        shuffled = [options[j] for j in perm]
        item = {
            "Question": question,
            "Options": dict(zip(MC_LETTERS, shuffled, strict=True)),
            "Correct_Answer": MC_LETTERS[perm.index(0)],
        }
        if item != avoid:
            return item


def _classification(
    p: _Person,
    names: list[str],
    spare: list[str],
    rng: np.random.Generator,
    avoid: dict[str, Any] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The multiple-choice items of one person: who is this, each fact from the picture, each
    fact by name. With `avoid` (the person's tasks), every item differs from its twin there."""
    name_pool = [n for n in names if n != p.name]
    if len(name_pool) < 3:
        name_pool += spare[: 3 - len(name_pool)]
    questions = {
        "Image_Textual_Questions": [(IDENTITY_QUESTION, p.name, name_pool)]
        + [(f.image_question, p.facts[f.key], list(f.values)) for f in FACTS],
        "Pure_Text_Questions": [
            (f.text_question.format(name=p.name), p.facts[f.key], list(f.values)) for f in FACTS
        ],
    }
    twins = avoid["Classification_Task"] if avoid else {}
    return {
        kind: [
            _mc(q, correct, pool, rng, twin)
            for (q, correct, pool), twin in zip(
                specs, twins.get(kind, [None] * len(specs)), strict=True
            )
        ]
        for kind, specs in questions.items()
    }


def _tasks(
    p: _Person, names: list[str], spare: list[str], rng: np.random.Generator
) -> dict[str, Any]:
    """Biography, training VQA pairs and the three evaluation tasks of one person."""
    bio = {"Name": p.name, **p.facts}
    metadata = [{"Question": q, "Answer": p.name} for q in IDENTITY_QUESTIONS] + [
        {"Question": f.image_question, "Answer": p.facts[f.key]} for f in FACTS
    ]
    classification = _classification(p, names, spare, rng)
    gen = (
        [{"Type": TYPE_IMAGE, "Question": IDENTITY_QUESTION, "Ground_Truth": p.name}]
        + [
            {"Type": TYPE_IMAGE, "Question": f.image_question, "Ground_Truth": p.facts[f.key]}
            for f in FACTS
        ]
        + [
            {
                "Type": TYPE_TEXT,
                "Question": f.text_question.format(name=p.name),
                "Ground_Truth": p.facts[f.key],
            }
            for f in FACTS
        ]
    )
    cloze = [
        {
            "Type": TYPE_IMAGE,
            "Question": f.cloze.format(subject=IMAGE_SUBJECT),
            "Ground_Truth": p.facts[f.key],
        }
        for f in FACTS
    ] + [
        {
            "Type": TYPE_TEXT,
            "Question": f.cloze.format(subject=p.name),
            "Ground_Truth": p.facts[f.key],
        }
        for f in FACTS
    ]
    return {
        "biography": json.dumps(bio),
        "metadata": json.dumps(metadata),
        "Classification_Task": classification,
        "Generation_Task": gen,
        "Mask_Task": cloze,
    }


def _row(p: _Person, tasks: dict[str, Any], pngs: list[bytes], kind: str) -> dict[str, Any]:
    images = [{"bytes": b, "path": f"{p.id}_{kind}_{k}.png"} for k, b in enumerate(pngs)]
    return {"ID": p.id, "image": images[0], "images": images, **tasks}


def _write_split(folder: Path, rows: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, folder / PARQUET_NAME, compression="snappy")


def read_appearances(folder: str | Path) -> dict[str, dict[str, str]]:
    """Entity id -> look (`faces.Identity` attributes) of a built-in benchmark; {} for others.

    Real benchmarks carry no description of their pictures; SIU then describes the picture
    neutrally (`siu.describe(None)`).
    """
    info_path = Path(folder) / "benchmark.json"
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text())
        return {pid: dict(p["identity"]) for pid, p in info.get("people", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
