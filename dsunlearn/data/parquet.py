"""Reading benchmark parquet: local folders through `datasets`, hub ids, and the shared checks.

Every benchmark loader (MLLMU-Bench, CLEAR, MMUBench) reads its splits through
`read_parquet_folder`, decodes pictures with `decode_image` and turns any failure into one
`DataError` line (`short_error`), so the three report problems the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dsunlearn.errors import DataError

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(path_or_hub_id: str) -> bool:
    """`owner/name`, and `owner` is not a local folder (then it was meant as a local path)."""
    if not _HUB_ID_RE.match(path_or_hub_id):
        return False
    return not Path(path_or_hub_id.split("/", 1)[0]).is_dir()


def read_parquet_folder(folder: Path, check: Callable[[pa.Schema, Path], None]) -> Any:
    """Every parquet file under `folder`: `check(schema, file)` each (one DataError line on a
    wrong schema), then load them through `datasets`, in memory."""
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise DataError(f"{folder}: no parquet file")
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{f}: unreadable parquet ({short_error(e)})") from e
        check(schema, f)

    import datasets  # heavy import: only when actually loading

    # A throw-away cache folder: the data is kept in memory, nothing lingers in ~/.cache.
    with quiet_datasets(), tempfile.TemporaryDirectory(prefix="dsunlearn-parquet-") as cache:
        try:
            return datasets.Dataset.from_parquet(
                [str(f) for f in files], keep_in_memory=True, cache_dir=cache
            )
        except Exception as e:  # datasets raises many types; all mean "cannot read this"
            raise DataError(f"{folder}: cannot read parquet ({short_error(e)})") from e


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars for tiny local reads; restore the caller's setting afterwards."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def short_error(e: BaseException) -> str:
    """First line of an exception message, capped, for one-line errors."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def is_image(t: pa.DataType) -> bool:
    """An Image struct as `datasets` writes it: {bytes, path}."""
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def decode_image(value: Any, where: str) -> Image.Image | None:
    """A PIL picture (RGB) from a decoded image, an {bytes, path} struct or None."""
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
            raise DataError(f"{where}: undecodable image ({short_error(e)})") from e
    return None
