"""MLLMU-Bench's layout and schema, and the one loader for it (built-in or real, local or hub).

Layout: `forget_{pct}/`, `retain_{100-pct}/`, `Full_Set/`, `Test_Set/` and (real benchmark only)
`Retain_Set/` (celebrities), each holding parquet files with one row per person. The built-in
generator writes exactly `SCHEMA`; the loader also accepts the variations the published dataset
may use (nested task columns stored as JSON strings, no `images` column outside Test_Set,
several parquet shards, no "Name" in the biography).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dsunlearn.errors import DataError

# ---------------------------------------------------------------------------------------------
# Layout and schema
# ---------------------------------------------------------------------------------------------

FULL_DIR = "Full_Set"
TEST_DIR = "Test_Set"
CELEBRITY_DIR = "Retain_Set"  # real celebrities: known before fine-tuning, must be kept
PARQUET_NAME = "train-00000-of-00001.parquet"  # the hub's name for a single-shard split
MC_LETTERS = ("A", "B", "C", "D")
TYPE_IMAGE = "Image_Textual"
TYPE_TEXT = "Pure_Text"


def forget_dir(forget_pct: int) -> str:
    """Folder of the forget split, e.g. `forget_10`."""
    return f"forget_{forget_pct}"


def retain_dir(forget_pct: int) -> str:
    """Folder of the matching retain split, e.g. `retain_90`."""
    return f"retain_{100 - forget_pct}"


_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_MC_ITEM = pa.struct(
    [
        ("Question", pa.string()),
        ("Options", pa.struct([(letter, pa.string()) for letter in MC_LETTERS])),
        ("Correct_Answer", pa.string()),
    ]
)
_TASK_ITEM = pa.struct(
    [("Type", pa.string()), ("Question", pa.string()), ("Ground_Truth", pa.string())]
)

COLUMNS: tuple[str, ...] = (
    "ID",
    "image",
    "images",
    "biography",
    "metadata",
    "Classification_Task",
    "Generation_Task",
    "Mask_Task",
)

_S = {"dtype": "string", "_type": "Value"}
_MC_FEATURE = {
    "Question": _S,
    "Options": {letter: _S for letter in MC_LETTERS},
    "Correct_Answer": _S,
}
_TASK_FEATURE = {"Type": _S, "Question": _S, "Ground_Truth": _S}
# The `datasets` Features of SCHEMA, as `Features.to_dict()` writes them into parquet metadata,
# so that `datasets` decodes `image`/`images` as PIL images.
HF_FEATURES: dict[str, Any] = {
    "ID": _S,
    "image": {"_type": "Image"},
    "images": {"feature": {"_type": "Image"}, "_type": "List"},
    "biography": _S,
    "metadata": _S,
    "Classification_Task": {
        "Image_Textual_Questions": {"feature": _MC_FEATURE, "_type": "List"},
        "Pure_Text_Questions": {"feature": _MC_FEATURE, "_type": "List"},
    },
    "Generation_Task": {"feature": _TASK_FEATURE, "_type": "List"},
    "Mask_Task": {"feature": _TASK_FEATURE, "_type": "List"},
}

SCHEMA: pa.Schema = pa.schema(
    [
        ("ID", pa.string()),
        ("image", _IMAGE),
        ("images", pa.list_(_IMAGE)),
        ("biography", pa.string()),
        ("metadata", pa.string()),
        (
            "Classification_Task",
            pa.struct(
                [
                    ("Image_Textual_Questions", pa.list_(_MC_ITEM)),
                    ("Pure_Text_Questions", pa.list_(_MC_ITEM)),
                ]
            ),
        ),
        ("Generation_Task", pa.list_(_TASK_ITEM)),
        ("Mask_Task", pa.list_(_TASK_ITEM)),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)

# What the loader insists on. `image`/`images`: at least one of them. `metadata` (training VQA
# pairs) is only needed where training happens, so Test_Set may lack it.
_REQUIRED = ("ID", "biography", "Classification_Task", "Generation_Task", "Mask_Task")
_REQUIRED_TRAIN = (*_REQUIRED, "metadata")

# ---------------------------------------------------------------------------------------------
# Loaded records
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(path_or_hub_id: str) -> bool:
    """`owner/name`, and `owner` is not a local folder (then it was meant as a local path)."""
    if not _HUB_ID_RE.match(path_or_hub_id):
        return False
    return not Path(path_or_hub_id.split("/", 1)[0]).is_dir()


def load_benchmark(path_or_hub_id: str, forget_pct: int = 10) -> Benchmark:
    """Load forget, retain and Test_Set of an MLLMU-Bench-shaped benchmark.

    `path_or_hub_id` is a local folder (built-in or downloaded MLLMU-Bench) or a hub id such as
    `MLLMMU/MLLMU-Bench`. Every problem is a one-line `DataError`.
    """
    if not 0 < forget_pct < 100:
        raise DataError(f"forget_pct must be between 1 and 99, got {forget_pct}")
    folders = {
        "forget": forget_dir(forget_pct),
        "retain": retain_dir(forget_pct),
        "test": TEST_DIR,
    }
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"data path is not a folder: {path_or_hub_id}")
        for folder in folders.values():  # report a missing split before loading anything
            if not (path / folder).is_dir():
                raise DataError(
                    f"{path / folder}: split folder not found (an MLLMU-Bench folder holds "
                    f"{folders['forget']}/, {folders['retain']}/ and {TEST_DIR}/)"
                )
        tables = {k: _read_local(path / folder, k != "test") for k, folder in folders.items()}
    elif looks_like_hub_id(path_or_hub_id):
        tables = {
            k: _read_hub(path_or_hub_id, folder, k != "test") for k, folder in folders.items()
        }
    else:
        raise DataError(f"data path not found: {path_or_hub_id}")

    splits = {
        k: _records(ds, f"{path_or_hub_id.rstrip('/')}/{folders[k]}") for k, ds in tables.items()
    }
    overlap = {r.id for r in splits["forget"]} & {r.id for r in splits["retain"]}
    if overlap:
        raise DataError(
            f"{path_or_hub_id}: forget and retain splits share IDs {sorted(overlap)[:5]}"
        )
    return Benchmark(
        forget=splits["forget"],
        retain=splits["retain"],
        test=splits["test"],
        source=str(path_or_hub_id),
        forget_pct=forget_pct,
    )


def load_celebrities(path_or_hub_id: str) -> list[EntityRecord]:
    """The celebrity people of MLLMU-Bench's `Retain_Set/` (schema of Test_Set: no training
    VQA needed). A local folder without `Retain_Set/` gives []: the built-in benchmark has no
    real people, so callers report the celebrity metrics as omitted. Other problems (a broken
    parquet, a hub id that cannot be loaded) are one-line `DataError`s."""
    where = f"{path_or_hub_id.rstrip('/')}/{CELEBRITY_DIR}"
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        if not (path / CELEBRITY_DIR).is_dir():
            return []
        return _records(_read_local(path / CELEBRITY_DIR, False), where)
    if looks_like_hub_id(path_or_hub_id):
        return _records(_read_hub(path_or_hub_id, CELEBRITY_DIR, False), where)
    raise DataError(f"data path not found: {path_or_hub_id}")


def _read_local(folder: Path, train_split: bool) -> Any:
    """Check the parquet schema of one split folder, then load it through `datasets`."""
    return read_parquet_folder(
        folder, lambda schema, _file: _check_schema(schema, str(folder), train_split)
    )


def read_parquet_folder(folder: Path, check: Callable[[pa.Schema, Path], None]) -> Any:
    """Every parquet file under `folder`: `check(schema, file)` each (one DataError line on a
    wrong schema), then load them through `datasets`, in memory. Shared by the benchmark
    loaders (MLLMU-Bench, CLEAR, MMUBench)."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no parquet file")
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: unreadable parquet ({_short(e)})") from e
        check(schema, f)

    import datasets  # heavy import: only when actually loading

    # A throw-away cache folder: the data is kept in memory, nothing lingers in ~/.cache.
    with _quiet(), tempfile.TemporaryDirectory(prefix="dsunlearn-parquet-") as cache:
        try:
            return datasets.Dataset.from_parquet(
                [str(f) for f in files], keep_in_memory=True, cache_dir=cache
            )
        except Exception as e:  # datasets raises many types; all mean "cannot read this"
            raise DataError(f"{folder}: cannot read parquet ({_short(e)})") from e


def _read_hub(hub_id: str, folder: str, train_split: bool) -> Any:
    """Load one split folder of a hub dataset; any failure becomes one DataError line."""
    import datasets

    try:  # progress bars stay on: the real dataset is a large download
        ds = datasets.load_dataset(hub_id, data_dir=folder, split="train")
    except Exception as e:  # offline, unknown repo, gated, missing folder...
        raise DataError(f"cannot load '{hub_id}' from the Hugging Face hub: {_short(e)}") from e
    _check_schema(ds.data.schema, f"{hub_id}/{folder}", train_split)
    return ds


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars for tiny local reads; restore the caller's setting afterwards."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _short(e: BaseException) -> str:
    """First line of an exception message, capped, for one-line errors."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_image(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def _check_schema(schema: pa.Schema, where: str, train_split: bool) -> None:
    """Missing or wrongly typed columns -> DataError naming the split folder and the column."""
    names = set(schema.names)
    for col in _REQUIRED_TRAIN if train_split else _REQUIRED:
        if col not in names:
            raise DataError(f"{where}: parquet is missing column '{col}'")
    if "image" not in names and "images" not in names:
        raise DataError(f"{where}: parquet is missing column 'image' (and has no 'images')")
    checks = {
        "ID": lambda t: _is_string(t) or pa.types.is_integer(t),
        "image": _is_image,
        "images": lambda t: _is_list(t) and _is_image(t.value_type),
        "biography": _is_string,
        "metadata": lambda t: _is_string(t) or _is_list(t),
        "Classification_Task": lambda t: _is_string(t) or pa.types.is_struct(t),
        "Generation_Task": lambda t: _is_string(t) or _is_list(t),
        "Mask_Task": lambda t: _is_string(t) or _is_list(t),
    }
    for col, ok in checks.items():
        if col in names and not ok(schema.field(col).type):
            raise DataError(f"{where}: column '{col}' has unexpected type {schema.field(col).type}")


def _records(ds: Any, where: str) -> list[EntityRecord]:
    return [_record(row, f"{where} row {i}") for i, row in enumerate(ds)]


def _json(value: Any, where: str, col: str) -> Any:
    """Nested columns may be Arrow structs or JSON strings; give Python objects either way."""
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: column '{col}' is not valid JSON ({e.msg})") from e
    return value


def _image(value: Any, where: str) -> Image.Image | None:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        raw = value.get("bytes")
        try:
            if raw:
                return Image.open(io.BytesIO(raw)).convert("RGB")
            if value.get("path") and os.path.exists(value["path"]):
                return Image.open(value["path"]).convert("RGB")
        except OSError as e:
            raise DataError(f"{where}: undecodable image ({_short(e)})") from e
    return None


def _mc_items(items: Any, where: str) -> list[MCItem]:
    out: list[MCItem] = []
    for q in items or []:
        options = _json(q.get("Options"), where, "Options") or {}
        letters = [k for k in sorted(options) if options[k] is not None]
        answer = str(q.get("Correct_Answer") or "").strip()[:1].upper()
        if answer not in letters:
            raise DataError(
                f"{where}: Correct_Answer {q.get('Correct_Answer')!r} is not one of {letters}"
            )
        out.append(
            MCItem(
                question=str(q["Question"]),
                options=[str(options[k]) for k in letters],
                answer_index=letters.index(answer),
            )
        )
    return out


def _task_items(items: Any) -> list[GenItem]:
    return [
        GenItem(
            type=str(t["Type"]), question=str(t["Question"]), ground_truth=str(t["Ground_Truth"])
        )
        for t in items or []
    ]


def _record(row: dict[str, Any], where: str) -> EntityRecord:
    """Decode one parquet row into an EntityRecord."""
    rid = str(row["ID"])
    bio = _json(row.get("biography"), where, "biography") or {}
    if not isinstance(bio, dict):
        raise DataError(f"{where}: column 'biography' is not a JSON object")
    images = [im for im in (_image(v, where) for v in row.get("images") or []) if im is not None]
    if not images:
        first = _image(row.get("image"), where)
        images = [first] if first is not None else []
    if not images:
        raise DataError(f"{where}: person {rid} has no image")
    meta = _json(row.get("metadata"), where, "metadata") or []
    cls = _json(row.get("Classification_Task"), where, "Classification_Task") or {}
    return EntityRecord(
        id=rid,
        name=str(bio.get("Name") or rid),
        biography=bio,
        images=images,
        metadata=[(str(m["Question"]), str(m["Answer"])) for m in meta],
        mc_image=_mc_items(cls.get("Image_Textual_Questions"), where),
        mc_text=_mc_items(cls.get("Pure_Text_Questions"), where),
        gen=_task_items(_json(row.get("Generation_Task"), where, "Generation_Task")),
        cloze=_task_items(_json(row.get("Mask_Task"), where, "Mask_Task")),
    )
