"""MLLMU-Bench's layout and schema, and the one loader for it (built-in or real, local or hub).

Layout: `forget_{pct}/`, `retain_{100-pct}/`, `Full_Set/`, `Test_Set/`, (real benchmark only)
`Retain_Set/` (celebrities) and (built-in only) `Val_Set/` (validation pictures and MC items),
each holding parquet files with one row per person. The built-in generator writes exactly
`SCHEMA`; the loader also accepts the variations the published dataset may use (nested task
columns stored as JSON strings, no `images` column outside Test_Set, several parquet shards, no
"Name" in the biography). How validation and test are told apart: `Benchmark.split` (the rule
is in dsunlearn/data/benchmark.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from dsunlearn.data.benchmark import Benchmark, EntityRecord, GenItem, MCItem, check_val_pct
from dsunlearn.data.benchmark import split_records as split_records  # for Retain_Set callers
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

# ---------------------------------------------------------------------------------------------
# Layout and schema
# ---------------------------------------------------------------------------------------------

FULL_DIR = "Full_Set"
TEST_DIR = "Test_Set"
VAL_DIR = "Val_Set"  # built-in only: other pictures and MC options, for model selection
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
# Loading
# ---------------------------------------------------------------------------------------------


def load_benchmark(
    path_or_hub_id: str, forget_pct: int = 10, val_pct: int = 20, split_seed: int = 0
) -> Benchmark:
    """Load forget, retain, Test_Set and, where there is one, Val_Set of an MLLMU-Bench-shaped
    benchmark.

    `path_or_hub_id` is a local folder (built-in or downloaded MLLMU-Bench) or a hub id such as
    `MLLMMU/MLLMU-Bench`. `val_pct` and `split_seed` set the hash rule that `Benchmark.split`
    uses when there is no Val_Set. Every problem is a one-line `DataError`.
    """
    if not 0 < forget_pct < 100:
        raise DataError(f"forget_pct must be between 1 and 99, got {forget_pct}")
    check_val_pct(val_pct)
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
        val_table = _read_local(path / VAL_DIR, False) if (path / VAL_DIR).is_dir() else None
    elif looks_like_hub_id(path_or_hub_id):
        tables = {
            k: _read_hub(path_or_hub_id, folder, k != "test") for k, folder in folders.items()
        }
        val_table = _read_hub(path_or_hub_id, VAL_DIR, False, optional=True)
    else:
        raise DataError(f"data path not found: {path_or_hub_id}")

    if val_table is not None:
        tables["val"], folders["val"] = val_table, VAL_DIR
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
        val=splits.get("val", []),
        val_folder=VAL_DIR if "val" in splits else "",
        val_pct=val_pct,
        split_seed=split_seed,
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


def _read_hub(hub_id: str, folder: str, train_split: bool, optional: bool = False) -> Any:
    """Load one split folder of a hub dataset; any failure becomes one DataError line, except
    that an `optional` folder the dataset does not have gives None."""
    import datasets

    try:  # progress bars stay on: the real dataset is a large download
        ds = datasets.load_dataset(hub_id, data_dir=folder, split="train")
    except Exception as e:  # offline, unknown repo, gated, missing folder...
        if optional and isinstance(e, FileNotFoundError):  # datasets' "no data files there"
            return None
        raise DataError(
            f"cannot load '{hub_id}' from the Hugging Face hub: {short_error(e)}"
        ) from e
    _check_schema(ds.data.schema, f"{hub_id}/{folder}", train_split)
    return ds


def _check_schema(schema: pa.Schema, where: str, train_split: bool) -> None:
    """Missing or wrongly typed columns -> DataError naming the split folder and the column."""
    names = set(schema.names)
    for col in _REQUIRED_TRAIN if train_split else _REQUIRED:
        if col not in names:
            raise DataError(f"{where}: parquet is missing column '{col}'")
    if "image" not in names and "images" not in names:
        raise DataError(f"{where}: parquet is missing column 'image' (and has no 'images')")
    checks = {
        "ID": lambda t: is_string(t) or pa.types.is_integer(t),
        "image": is_image,
        "images": lambda t: is_list(t) and is_image(t.value_type),
        "biography": is_string,
        "metadata": lambda t: is_string(t) or is_list(t),
        "Classification_Task": lambda t: is_string(t) or pa.types.is_struct(t),
        "Generation_Task": lambda t: is_string(t) or is_list(t),
        "Mask_Task": lambda t: is_string(t) or is_list(t),
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
    images = [
        im for im in (decode_image(v, where) for v in row.get("images") or []) if im is not None
    ]
    if not images:
        first = decode_image(row.get("image"), where)
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
