"""CLEAR (hub `therem/CLEAR`): layout, per-config schema and the loader.

Facts and their sources:

- Layout: one folder per config, each holding `train-00000-of-00001.parquet`, and a README whose
  `configs:` maps `config_name: X` to `data_files: [{split: train, path: X/train-*}]`
  (huggingface.co/datasets/therem/CLEAR, tree at commit a7438d4 and commits b9a222a, 2bf6316).
  `datasets.load_dataset("therem/CLEAR", config)` loads one (the dataset card's own example).
- Configs and features (the dataset card's `dataset_info`, huggingface.co/datasets/therem/CLEAR
  /blob/main/README.md; ../shared/papers/README.md):
  - `full`, `forget01/05/10`, `retain99/95/90`: {image, caption, name}, one row per picture.
  - `+tofu` variants: {image, caption, question, answer}. Picture rows carry image and caption;
    TOFU text rows carry question and answer, image null (the CLEAR code,
    github.com/somvy/multimodal_unlearning mm/dataset.py, tells them apart by `image is None`).
  - `forgetXX_perturbed` and `retain_perturbed`: {image, caption, name, paraphrased_caption,
    perturbed_captions: list, perturbed_names: list}, for multiple-choice name recognition.
  - `real_faces`: {image, answer, options: list}; `real_world`: {question, answer, image,
    options: list}. The card lists real_faces in full; for real_world it shows `question` first,
    the other columns are the ones the CLEAR eval config (config/mm/eval.yaml) reads. `options`
    are the wrong answers only: eval.yaml uses them as the perturbed answers next to `answer`.
- Every config has the single split `train`. real_world was first uploaded as split `test`
  (the card at commit 2bf6316); commit 73a6323 deleted real_world/test-00000-of-00001.parquet,
  leaving train-00000-of-00001.parquet, and the CLEAR code loads every config, real_world
  included, with `split="train"` (mm/dataset.py, ImageCaptioningDataset).
- The hub also has `default` (folder `data/`): the same rows and columns as `full`, so it is
  not listed here.

The loader accepts `datasets`-written parquet (Image structs {bytes, path}), several shards, list
columns stored as JSON strings, and any column order. Every problem is a one-line `DataError`
that names the config and the column.

Validation and test (`load_clear(..., split="val" | "test")`): CLEAR has no validation split, so
a seeded hash cuts every config's rows. A row's key is the sha256 of its picture's file bytes,
or its question for a row without a picture (the `+tofu` text rows); the row is a validation row
iff `int(sha256(f"{seed}|{key}").hexdigest()[:8], 16) % 100 < val_pct`, a test row otherwise.
The key holds no config name, so the same picture in `forgetXX`, `forgetXX_perturbed`,
`forgetXX+tofu` and `full` is on the same side everywhere. `split_rule` says it in words.

Training (`load_clear_benchmark`): the forget and retain people of `forgetXX` / `retainXX` with
their pictures, each picture paired with its own caption, and their `+tofu` text QA, as the
`Benchmark` the unlearning methods and `dsunlearn learn` train on (`data.benchmark: clear`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

from dsunlearn.data.benchmark import (
    Benchmark,
    EntityRecord,
    GenItem,
    check_split,
    check_val_pct,
)
from dsunlearn.data.mllmu import TYPE_TEXT
from dsunlearn.data.parquet import (
    decode_image,
    is_image,
    is_list,
    is_string,
    looks_like_hub_id,
    read_parquet_folder,
    short_error,
)
from dsunlearn.errors import DataError

HUB_ID = "therem/CLEAR"
SPLIT = "train"
PARQUET_NAME = "train-00000-of-00001.parquet"
FORGET_PCTS = (1, 5, 10)

KIND_CAPTIONS = "captions"  # full, forgetXX, retainXX
KIND_TOFU = "tofu"  # ...+tofu
KIND_PERTURBED = "perturbed"  # forgetXX_perturbed, retain_perturbed
KIND_REAL_FACES = "real_faces"
KIND_REAL_WORLD = "real_world"

# Columns of each kind, in the dataset card's order.
COLUMNS: dict[str, tuple[str, ...]] = {
    KIND_CAPTIONS: ("image", "caption", "name"),
    KIND_TOFU: ("image", "caption", "question", "answer"),
    KIND_PERTURBED: (
        "image",
        "caption",
        "name",
        "perturbed_captions",
        "paraphrased_caption",
        "perturbed_names",
    ),
    KIND_REAL_FACES: ("image", "answer", "options"),
    KIND_REAL_WORLD: ("question", "answer", "image", "options"),
}
LIST_COLUMNS = frozenset({"perturbed_captions", "perturbed_names", "options"})


def forget_config(pct: int) -> str:
    """`forget01`, `forget05` or `forget10`."""
    _check_pct(pct)
    return f"forget{pct:02d}"


def retain_config(pct: int) -> str:
    """The retain config matching `forget_config(pct)`: `retain99`, `retain95`, `retain90`."""
    _check_pct(pct)
    return f"retain{100 - pct}"


def _check_pct(pct: int) -> None:
    if pct not in FORGET_PCTS:
        raise DataError(f"CLEAR forget percentage must be one of {FORGET_PCTS}, got {pct}")


CONFIGS: tuple[str, ...] = (
    "full",
    "full+tofu",
    *(forget_config(p) for p in FORGET_PCTS),
    *(forget_config(p) + "+tofu" for p in FORGET_PCTS),
    *(forget_config(p) + "_perturbed" for p in FORGET_PCTS),
    *(retain_config(p) for p in FORGET_PCTS),
    *(retain_config(p) + "+tofu" for p in FORGET_PCTS),
    "retain_perturbed",
    "real_faces",
    "real_world",
)


def config_kind(config: str) -> str:
    """Which schema a config follows; an unknown config name is a DataError."""
    if config not in CONFIGS:
        raise DataError(f"unknown CLEAR config '{config}' (known: {', '.join(CONFIGS)})")
    if config in (KIND_REAL_FACES, KIND_REAL_WORLD):
        return config
    if config.endswith("+tofu"):
        return KIND_TOFU
    if config.endswith("_perturbed"):
        return KIND_PERTURBED
    return KIND_CAPTIONS


_S = {"dtype": "string", "_type": "Value"}
_FEATURE = {
    "image": {"_type": "Image"},
    **{c: _S for c in ("caption", "name", "question", "answer", "paraphrased_caption")},
    **{c: {"feature": _S, "_type": "List"} for c in LIST_COLUMNS},
}
_ARROW = {
    "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    **{c: pa.string() for c in ("caption", "name", "question", "answer", "paraphrased_caption")},
    **{c: pa.list_(pa.string()) for c in LIST_COLUMNS},
}


def schema(config: str) -> pa.Schema:
    """The exact Arrow schema of a config, with the `datasets` features in its metadata."""
    cols = COLUMNS[config_kind(config)]
    features = {c: _FEATURE[c] for c in cols}
    return pa.schema(
        [(c, _ARROW[c]) for c in cols],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptionRow:
    """A picture of a fictitious person. The `_perturbed` configs fill the last three fields;
    `+tofu` configs have no `name` column (None)."""

    image: Image.Image
    caption: str
    name: str | None
    paraphrased_caption: str | None = None
    perturbed_captions: list[str] = field(default_factory=list)
    perturbed_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TextQA:
    """A TOFU question about a person, text only (`+tofu` configs)."""

    question: str
    answer: str


@dataclass
class ChoiceRow:
    """`real_faces` (question None: "The name of the person on the image is") or `real_world`
    VQA. `options` are the wrong answers; `choices` puts the right one first."""

    image: Image.Image
    question: str | None
    answer: str
    options: list[str]

    @property
    def choices(self) -> list[str]:
        return [self.answer, *self.options]


@dataclass
class ClearSplit:
    """One CLEAR config, decoded. Only the lists its kind uses are filled."""

    config: str
    kind: str
    source: str
    captions: list[CaptionRow] = field(default_factory=list)
    text_qa: list[TextQA] = field(default_factory=list)
    choices: list[ChoiceRow] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The people of the split, in order of first appearance."""
        return list(dict.fromkeys(r.name for r in self.captions if r.name))

    def __len__(self) -> int:
        return len(self.captions) + len(self.text_qa) + len(self.choices)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_clear(
    path_or_hub_id: str,
    config: str,
    split: str | None = None,
    val_pct: int = 20,
    seed: int = 0,
) -> ClearSplit:
    """Load one CLEAR config from a local folder (the hub repo's layout) or a hub id: every row
    (`split` None), or only the rows the seeded hash of the module docstring puts in "val" or
    "test" (`val_pct` percent of them go to "val").

    Every problem (unknown config or split, val_pct outside 1..99, missing config folder,
    missing or mistyped column, malformed JSON list, undecodable image, hub unreachable) is a
    one-line `DataError`.
    """
    kind = config_kind(config)
    if split is not None:
        check_split(split)
        check_val_pct(val_pct)
    where = f"{path_or_hub_id.rstrip('/')}/{config}"
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"data path is not a folder: {path_or_hub_id}")
        table = _read_local(path / config, kind)
    elif looks_like_hub_id(path_or_hub_id):
        table = _read_hub(path_or_hub_id, config, kind)
    else:
        raise DataError(f"data path not found: {path_or_hub_id}")
    out = ClearSplit(config=config, kind=kind, source=str(path_or_hub_id))
    for i, row in enumerate(table.to_pylist()):
        here = f"{where} row {i}"
        if split is None or (split == "val") == in_val(row, val_pct, seed, here):
            _add_row(out, row, here)
    return out


def split_rule(val_pct: int, seed: int) -> str:
    """The rule `load_clear(..., split=...)` applies, in words, for the report."""
    return (
        f"hash: int(sha256('{seed}|' + sha256(picture bytes), or the question of a text-only "
        f"row)[:8 hex], 16) % 100 < {val_pct} -> validation (about {val_pct}% of the rows, the "
        "same picture on the same side in every config), the rest -> test"
    )


def in_val(row: dict[str, Any], val_pct: int, seed: int, where: str) -> bool:
    """Whether a raw row (its Image struct undecoded) is a validation row."""
    key = f"{seed}|{_row_key(row, where)}".encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) % 100 < val_pct


def _row_key(row: dict[str, Any], where: str) -> str:
    """The sha256 of the row's picture file, or its question when it has no picture."""
    image = row.get("image")  # a raw Image struct {bytes, path}
    if image is None:
        return _str(row, "question", where)
    raw = image.get("bytes")
    if not raw and image.get("path"):
        try:
            raw = Path(image["path"]).read_bytes()
        except OSError as e:
            raise DataError(f"{where}: unreadable image file ({short_error(e)})") from e
    if not raw:
        raise DataError(f"{where}: column 'image' holds no image")
    return hashlib.sha256(raw).hexdigest()


def _read_local(folder: Path, kind: str) -> pa.Table:
    if not folder.is_dir():
        raise DataError(
            f"{folder}: config folder not found (a CLEAR folder holds one folder per config, "
            f"e.g. forget05/ with {PARQUET_NAME})"
        )
    ds = read_parquet_folder(folder, lambda schema, f: check_schema(schema, str(f), kind))
    return _arrow(ds)


def _read_hub(hub_id: str, config: str, kind: str) -> pa.Table:
    import datasets

    try:  # progress bars stay on: the real dataset is a large download
        ds = datasets.load_dataset(hub_id, config, split=SPLIT)
    except Exception as e:  # offline, unknown repo, unknown config...
        raise DataError(
            f"cannot load '{hub_id}' config '{config}' from the Hugging Face hub: {short_error(e)}"
        ) from e
    table = _arrow(ds)
    check_schema(table.schema, f"{hub_id}/{config}", kind)
    return table


def _arrow(ds: Any) -> pa.Table:
    """The raw Arrow rows (image bytes undecoded: we decode, and report bad bytes ourselves)."""
    return ds.with_format("arrow")[:]


def check_schema(file_schema: pa.Schema, where: str, kind: str) -> None:
    """A missing or wrongly typed column -> DataError naming `where` and the column."""
    names = set(file_schema.names)
    expected = COLUMNS[kind]
    for col in expected:
        if col not in names:
            raise DataError(
                f"{where}: parquet is missing column '{col}' (this config has "
                f"{', '.join(expected)})"
            )
    checks: dict[str, Callable[[pa.DataType], bool]] = {
        "image": is_image,
        **{c: is_string for c in ("caption", "name", "question", "answer", "paraphrased_caption")},
        **{c: _is_string_list for c in LIST_COLUMNS},
    }
    for col in expected:
        t = file_schema.field(col).type
        if not checks[col](t) and not pa.types.is_null(t):
            want = (
                "an image struct {bytes, path}"
                if col == "image"
                else ("a list of strings" if col in LIST_COLUMNS else "string")
            )
            raise DataError(f"{where}: column '{col}' has type {t}, expected {want}")


def _is_string_list(t: pa.DataType) -> bool:
    """A list of strings, or a string holding a JSON list."""
    return is_string(t) or (is_list(t) and is_string(t.value_type))


def _str(row: dict[str, Any], col: str, where: str) -> str:
    value = row.get(col)
    if value is None:
        raise DataError(f"{where}: column '{col}' is empty")
    return str(value)


def _opt_str(row: dict[str, Any], col: str) -> str | None:
    value = row.get(col)
    return None if value is None else str(value)


def _str_list(row: dict[str, Any], col: str, where: str) -> list[str]:
    """A list column, or the same list written as a JSON string."""
    value = row.get(col)
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column '{col}' is not valid JSON ({e.msg})") from e
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: column '{col}' is not a JSON list of strings")
    return [str(v) for v in value]


def _img(row: dict[str, Any], where: str) -> Image.Image:
    im = decode_image(row.get("image"), where)
    if im is None:
        raise DataError(f"{where}: column 'image' holds no image")
    return im


def _add_row(out: ClearSplit, row: dict[str, Any], where: str) -> None:
    kind = out.kind
    if kind == KIND_TOFU and row.get("image") is None:  # a TOFU text row
        out.text_qa.append(
            TextQA(question=_str(row, "question", where), answer=_str(row, "answer", where))
        )
    elif kind in (KIND_CAPTIONS, KIND_TOFU, KIND_PERTURBED):
        out.captions.append(
            CaptionRow(
                image=_img(row, where),
                caption=_str(row, "caption", where),
                name=_opt_str(row, "name") if kind == KIND_TOFU else _str(row, "name", where),
                paraphrased_caption=_opt_str(row, "paraphrased_caption"),
                perturbed_captions=_str_list(row, "perturbed_captions", where),
                perturbed_names=_str_list(row, "perturbed_names", where),
            )
        )
    else:
        out.choices.append(
            ChoiceRow(
                image=_img(row, where),
                question=_opt_str(row, "question"),
                answer=_str(row, "answer", where),
                options=_str_list(row, "options", where),
            )
        )


# ---------------------------------------------------------------------------------------------
# Training data: the Benchmark the unlearning methods train on
# ---------------------------------------------------------------------------------------------

# CLEAR has captions but no question for them (the CLEAR code trains on the caption alone);
# this prompt is ours, and the evaluation protocol asks the same one
# (dsunlearn/eval/benchmarks/clear.py), so its MIA members are exactly the trained pairs.
CAPTION_PROMPT = "Describe the person in this picture."


def load_clear_benchmark(
    path_or_hub_id: str, forget_pct: int = 10, val_pct: int = 20, split_seed: int = 0
) -> Benchmark:
    """The forget and retain people of CLEAR's `forgetXX` / `retainXX` configs (XX from
    `forget_pct`), as the `Benchmark` every method trains on.

    Per person (rows grouped by `name`, in order of first appearance): its pictures, each with
    its own training pair (CAPTION_PROMPT, that picture's caption) in `EntityRecord.image_qa`,
    not in `metadata`. `vqa_train_examples` pairs `metadata` with every picture of a person,
    which suits MLLMU-Bench's per-person questions; a CLEAR caption describes one picture (pose,
    setting, clothes), and the CLEAR paper fine-tunes and unlearns on (picture, its caption)
    pairs, so each picture gets only its own caption: one example per row of the config.

    Text QA (`forgetXX+tofu` / `retainXX+tofu`, TOFU's questions about the same people) go in
    `gen` as Pure_Text items, the ones `text_qa_examples` reads (`dsunlearn learn`, MMUnlearner's
    saliency). The text rows have no `name` column: a row belongs to the person whose name its
    question or answer contains (the longest such name), else to the person of the row before
    (TOFU keeps each person's questions together), else to the config's first person.

    `biography` is {"description": the person's first caption} (CLEAR has no key-value facts;
    SIU states it as the person's true facts); `test` is [] (CLEAR has no held-out pictures:
    its protocol evaluates the forget and retain configs themselves, cut by the seeded hash of
    the module docstring). Evaluation items (mc_*, cloze) stay empty: the CLEAR protocol reads
    its own configs. Problems are one-line DataErrors.
    """
    check_val_pct(val_pct)
    forget_cfg, retain_cfg = forget_config(forget_pct), retain_config(forget_pct)
    groups: dict[str, list[EntityRecord]] = {}
    for cfg in (forget_cfg, retain_cfg):
        people = _people(load_clear(path_or_hub_id, cfg), f"{path_or_hub_id}/{cfg}")
        _add_text_qa(people, load_clear(path_or_hub_id, cfg + "+tofu"), TYPE_TEXT)
        groups[cfg] = list(people.values())
    both = {r.name for r in groups[forget_cfg]} & {r.name for r in groups[retain_cfg]}
    if both:
        raise DataError(
            f"{path_or_hub_id}: {forget_cfg} and {retain_cfg} share people {sorted(both)[:5]}"
        )
    return Benchmark(
        forget=groups[forget_cfg],
        retain=groups[retain_cfg],
        test=[],
        source=f"CLEAR {path_or_hub_id} ({forget_cfg}/{retain_cfg})",
        forget_pct=forget_pct,
        val_pct=val_pct,
        split_seed=split_seed,
    )


def _people(split: ClearSplit, where: str) -> dict[str, EntityRecord]:
    people: dict[str, EntityRecord] = {}
    for row in split.captions:
        name = row.name or ""
        if name not in people:
            people[name] = EntityRecord(
                id=name,
                name=name,
                biography={"description": row.caption},
                images=[],
                metadata=[],
                mc_image=[],
                mc_text=[],
                gen=[],
                cloze=[],
            )
        people[name].images.append(row.image)
        people[name].image_qa.append([(CAPTION_PROMPT, row.caption)])
    if not people:
        raise DataError(f"{where}: no picture of a named person")
    return people


def _add_text_qa(people: dict[str, EntityRecord], tofu: ClearSplit, text_type: str) -> None:
    """Each TOFU row to its person (the rule in `load_clear_benchmark`)."""
    names = sorted(people, key=len, reverse=True)
    current = next(iter(people))
    for qa in tofu.text_qa:
        current = next((n for n in names if n in qa.question or n in qa.answer), current)
        people[current].gen.append(GenItem(text_type, qa.question, qa.answer))
