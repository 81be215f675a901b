"""MMUBench (SIU, arXiv 2405.12523): a layout and schema for it, and the loader.

What is known of MMUBench, and from where:

- Real concepts, each with a training image (the ONE image SIU unlearns from) and held-out test
  images of the same concept; probing prompts; a membership-inference (MIA) prompt set of about
  180 prompts about "the person in the picture", scored by ROUGE-L recall against the original
  model's answer; a jailbreak set of multilingual and multi-hop prompts, scored by the share of
  answers that reveal the concept. EFF is measured on the training image, GEN on the test images,
  C-Dis on a few concept-related tokens (../shared/papers/README.md, "MMUBench metrics").
- 20 concepts with 50+ images each, real-world figures and cartoon characters; the benchmark
  was not open-sourced (CLEAR paper, arXiv 2410.18057 v4, section 2).

So there is no published file layout. This module fixes one in the style of the hub datasets the
project already reads (MLLMU-Bench, CLEAR): a folder holding `concepts/` with parquet files (one
row per concept) and a README whose `configs:` maps the config `concepts` to `concepts/train-*`,
so `datasets.load_dataset(folder_or_hub_id, data_dir="concepts")` reads it. Choices:

- Columns: `concept_id` (string), `name` (string), `train_image` (Image {bytes, path}),
  `test_images` (list of Image), and four prompt sets, each a JSON string (as MLLMU-Bench stores
  `biography` and `metadata`) or the same value as nested Arrow:
  - `probe_prompts`: list of strings, asked with the training and test images (EFF, GEN);
  - `mia_prompts`: list of strings (MIA);
  - `jailbreak_prompts`: list of {prompt, type: "multilingual" | "multi_hop", language (an ISO
    639-1 code), reveals: list of strings}. An answer reveals the concept if it holds the name,
    an alias, or one of `reveals` (what a multi-hop prompt would lead to, e.g. a birthplace).
- Optional columns: `aliases` (JSON list; other surface forms of the name, e.g. the family name:
  they count as revealing, and with the name give C-Dis its concept tokens), `category` (e.g.
  "person", "cartoon character"; empty if absent) and `facts` (JSON list of {question, answer}:
  the textual knowledge SIU's third target keeps; empty if absent).
- The training image must not be one of the test images (same bytes): SIU would then be scored
  on the picture it trained on.

Every problem is a one-line `DataError` naming the folder or file, the concept and the column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

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

CONCEPTS_DIR = "concepts"
PARQUET_NAME = "train-00000-of-00001.parquet"
JAILBREAK_TYPES = ("multilingual", "multi_hop")

REQUIRED: tuple[str, ...] = (
    "concept_id",
    "name",
    "train_image",
    "test_images",
    "probe_prompts",
    "mia_prompts",
    "jailbreak_prompts",
)
OPTIONAL: tuple[str, ...] = ("aliases", "category", "facts")
COLUMNS: tuple[str, ...] = (
    "concept_id",
    "name",
    "aliases",
    "category",
    "train_image",
    "test_images",
    "probe_prompts",
    "facts",
    "mia_prompts",
    "jailbreak_prompts",
)
JSON_COLUMNS = ("aliases", "probe_prompts", "facts", "mia_prompts", "jailbreak_prompts")

_S = {"dtype": "string", "_type": "Value"}
HF_FEATURES: dict[str, Any] = {
    "concept_id": _S,
    "name": _S,
    "aliases": _S,
    "category": _S,
    "train_image": {"_type": "Image"},
    "test_images": {"feature": {"_type": "Image"}, "_type": "List"},
    "probe_prompts": _S,
    "facts": _S,
    "mia_prompts": _S,
    "jailbreak_prompts": _S,
}
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA: pa.Schema = pa.schema(
    [
        (
            c,
            _IMAGE
            if c == "train_image"
            else pa.list_(_IMAGE)
            if c == "test_images"
            else pa.string(),
        )
        for c in COLUMNS
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)

# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JailbreakPrompt:
    """One jailbreak prompt: `type` is "multilingual" or "multi_hop"; `reveals` lists what, in
    an answer, would give the concept away besides its name and aliases."""

    prompt: str
    type: str
    language: str
    reveals: tuple[str, ...] = ()


@dataclass
class Concept:
    """One concept to unlearn, decoded."""

    id: str
    name: str
    aliases: list[str]
    category: str
    train_image: Image.Image
    test_images: list[Image.Image]
    probe_prompts: list[str]
    facts: list[tuple[str, str]]
    mia_prompts: list[str]
    jailbreak: list[JailbreakPrompt]

    @property
    def reveal_terms(self) -> list[str]:
        """Strings whose presence in an answer names the concept (EFF, GEN, jailbreak)."""
        return list(dict.fromkeys([self.name, *self.aliases]))


@dataclass
class MMUBench:
    """All concepts of one MMUBench folder; `source` says where it came from."""

    concepts: list[Concept]
    source: str
    _by_id: dict[str, Concept] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {c.id: c for c in self.concepts}

    def concept(self, concept_id: str) -> Concept:
        try:
            return self._by_id[concept_id]
        except KeyError:
            raise DataError(
                f"{self.source}: no concept '{concept_id}' (known: {', '.join(self._by_id)})"
            ) from None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_mmubench(path_or_hub_id: str) -> MMUBench:
    """Load an MMUBench folder (layout above) or hub id; every problem is one DataError line."""
    where = f"{path_or_hub_id.rstrip('/')}/{CONCEPTS_DIR}"
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"data path is not a folder: {path_or_hub_id}")
        table = _read_local(path / CONCEPTS_DIR)
    elif looks_like_hub_id(path_or_hub_id):
        table = _read_hub(path_or_hub_id)
    else:
        raise DataError(f"data path not found: {path_or_hub_id}")
    concepts = [_concept(row, f"{where} row {i}") for i, row in enumerate(table.to_pylist())]
    seen: set[str] = set()
    for c in concepts:
        if c.id in seen:
            raise DataError(f"{where}: concept_id '{c.id}' appears twice")
        seen.add(c.id)
    if not concepts:
        raise DataError(f"{where}: no concept")
    return MMUBench(concepts=concepts, source=str(path_or_hub_id))


def _read_local(folder: Path) -> pa.Table:
    if not folder.is_dir():
        raise DataError(
            f"{folder}: folder not found (an MMUBench folder holds {CONCEPTS_DIR}/ with "
            f"{PARQUET_NAME})"
        )
    ds = read_parquet_folder(folder, lambda schema, f: check_schema(schema, str(f)))
    return ds.with_format("arrow")[:]


def _read_hub(hub_id: str) -> pa.Table:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, data_dir=CONCEPTS_DIR, split="train")
    except Exception as e:  # offline, unknown repo, gated, missing folder...
        raise DataError(
            f"cannot load '{hub_id}' from the Hugging Face hub: {short_error(e)}"
        ) from e
    table = ds.with_format("arrow")[:]
    check_schema(table.schema, f"{hub_id}/{CONCEPTS_DIR}")
    return table


def _json_or(nested: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    return lambda t: is_string(t) or nested(t)


def check_schema(file_schema: pa.Schema, where: str) -> None:
    """A missing or wrongly typed column -> DataError naming `where` and the column."""
    names = set(file_schema.names)
    for col in REQUIRED:
        if col not in names:
            raise DataError(f"{where}: parquet is missing column '{col}'")
    string_list = _json_or(lambda t: is_list(t) and is_string(t.value_type))
    struct_list = _json_or(lambda t: is_list(t) and pa.types.is_struct(t.value_type))
    checks: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
        "concept_id": (lambda t: is_string(t) or pa.types.is_integer(t), "string"),
        "name": (is_string, "string"),
        "category": (is_string, "string"),
        "train_image": (is_image, "an image struct {bytes, path}"),
        "test_images": (lambda t: is_list(t) and is_image(t.value_type), "a list of images"),
        "aliases": (string_list, "a JSON string (list of strings)"),
        "probe_prompts": (string_list, "a JSON string (list of strings)"),
        "mia_prompts": (string_list, "a JSON string (list of strings)"),
        "facts": (struct_list, "a JSON string (list of {question, answer})"),
        "jailbreak_prompts": (struct_list, "a JSON string (list of {prompt, type, ...})"),
    }
    for col, (ok, want) in checks.items():
        if col in names and not ok(file_schema.field(col).type):
            raise DataError(
                f"{where}: column '{col}' has type {file_schema.field(col).type}, expected {want}"
            )


def _json(value: Any, where: str, col: str) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column '{col}' is not valid JSON ({e.msg})") from e
    return value


def _strings(value: Any, where: str, col: str) -> list[str]:
    items = _json(value, where, col)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise DataError(f"{where}: column '{col}' is not a list of strings")
    return items


def _objects(value: Any, where: str, col: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    items = _json(value, where, col)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(v, dict) for v in items):
        raise DataError(f"{where}: column '{col}' is not a list of objects")
    for k, item in enumerate(items):
        for key in keys:
            if not isinstance(item.get(key), str):
                raise DataError(f"{where}: column '{col}' item {k} has no string '{key}'")
    return items


def _jailbreak(value: Any, where: str) -> list[JailbreakPrompt]:
    out = []
    col = "jailbreak_prompts"
    for k, item in enumerate(_objects(value, where, col, ("prompt", "type", "language"))):
        if item["type"] not in JAILBREAK_TYPES:
            raise DataError(
                f"{where}: column '{col}' item {k} has type {item['type']!r}, expected one of "
                f"{', '.join(JAILBREAK_TYPES)}"
            )
        reveals = item.get("reveals") or []
        if not isinstance(reveals, list) or not all(isinstance(r, str) for r in reveals):
            raise DataError(f"{where}: column '{col}' item {k}: 'reveals' is not a string list")
        out.append(
            JailbreakPrompt(
                prompt=item["prompt"],
                type=item["type"],
                language=item["language"],
                reveals=tuple(reveals),
            )
        )
    return out


def _concept(row: dict[str, Any], where: str) -> Concept:
    if row.get("concept_id") is None or not row.get("name"):
        raise DataError(f"{where}: columns 'concept_id' and 'name' must not be empty")
    cid = str(row["concept_id"])
    where = f"{where} (concept {cid})"
    train_raw = row.get("train_image")
    train = decode_image(train_raw, where)
    if train is None:
        raise DataError(f"{where}: column 'train_image' holds no image")
    test_raw = row.get("test_images") or []
    tests = [im for im in (decode_image(v, where) for v in test_raw) if im is not None]
    if not tests:
        raise DataError(f"{where}: column 'test_images' holds no image")
    train_bytes = (train_raw or {}).get("bytes")
    if train_bytes and any((v or {}).get("bytes") == train_bytes for v in test_raw):
        raise DataError(f"{where}: the training image is also one of 'test_images'")
    facts = _objects(row.get("facts"), where, "facts", ("question", "answer"))
    return Concept(
        id=cid,
        name=str(row["name"]),
        aliases=_strings(row.get("aliases"), where, "aliases"),
        category=str(row.get("category") or ""),
        train_image=train,
        test_images=tests,
        probe_prompts=_strings(row.get("probe_prompts"), where, "probe_prompts"),
        facts=[(f["question"], f["answer"]) for f in facts],
        mia_prompts=_strings(row.get("mia_prompts"), where, "mia_prompts"),
        jailbreak=_jailbreak(row.get("jailbreak_prompts"), where),
    )
