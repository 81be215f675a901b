"""POPE (Polling-based Object Probing Evaluation, Li et al. 2023) in its published layout.

A POPE folder holds question files and the pictures they ask about:

    <folder>/coco_pope_random.json        one JSON object per line:
    <folder>/coco_pope_popular.json         {"question_id": 1, "image": "COCO_val2014_...jpg",
    <folder>/coco_pope_adversarial.json      "text": "Is there a dog in the image?",
    <folder>/images/ (or val2014/, or the     "label": "yes"}
             folder itself)               half the questions "yes", half "no"

The three files differ only in how the absent objects ("no") were sampled: at random, among the
most frequent objects, or among those that co-occur most with the present ones. Other datasets'
files (`aokvqa_pope_random.json`, `gqa_pope_popular.jsonl`, ...) and a `.jsonl` suffix are read
too; a file holding one JSON array instead of lines is accepted. Pictures are decoded only when
asked for (`Pope.image`): the published set asks 9000 questions about 500 COCO pictures.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dsunlearn.errors import DataError

SAMPLINGS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
IMAGE_DIRS = ("images", "val2014")  # then the folder itself
KEYS = ("question_id", "image", "text", "label")
_FILE_RE = re.compile(r"(?P<dataset>\w+?)_pope_(?P<sampling>random|popular|adversarial)\.jsonl?")


@dataclass(frozen=True)
class PopeQuestion:
    question_id: str
    image: str  # file name, as the question file gives it
    text: str
    label: str  # "yes" (the object is in the picture) or "no"


@dataclass
class Pope:
    """Question sets by name ("random", "popular", "adversarial"; "<dataset>_<sampling>" for
    datasets other than COCO), in file order; `image_paths`: each picture's resolved file."""

    source: str
    sets: dict[str, list[PopeQuestion]]
    files: dict[str, Path]  # set name -> its question file
    image_paths: dict[str, Path] = field(default_factory=dict)

    def image(self, name: str) -> Image.Image:
        """The picture `name` (RGB), decoded now; undecodable is a one-line DataError."""
        path = self.image_paths[name]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise DataError(f"{path}: undecodable image ({type(e).__name__})") from e


def set_name(file_name: str) -> str | None:
    """The set a question file holds ("random" for coco_pope_random.json), None if it is not a
    POPE question file."""
    m = _FILE_RE.fullmatch(file_name)
    if m is None:
        return None
    dataset, sampling = m["dataset"], m["sampling"]
    return sampling if dataset == "coco" else f"{dataset}_{sampling}"


def _order(name: str) -> tuple[str, int]:
    """COCO's sets first, then each other dataset's; random, popular, adversarial."""
    dataset, _, sampling = name.rpartition("_")
    return dataset, SAMPLINGS.index(sampling)


def _records(path: Path) -> list[tuple[str, Any]]:
    """(where, parsed object) per question: JSON lines, or one JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__})") from e
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        return [(f"{path} item {i}", obj) for i, obj in enumerate(items)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {n}", json.loads(line)))
        except ValueError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from e
    return out


def _question(where: str, obj: Any) -> PopeQuestion:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(KEYS)}")
    for key in KEYS:
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}'")
    for key in ("image", "text", "label"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string, got {obj[key]!r}")
    label = obj["label"].strip().lower()
    if label not in LABELS:
        raise DataError(f"{where}: label must be 'yes' or 'no', got {obj['label']!r}")
    return PopeQuestion(str(obj["question_id"]), obj["image"].strip(), obj["text"].strip(), label)


def load_pope(path: str | Path) -> Pope:
    """Every POPE question file of folder `path`, with each picture's file found; a missing
    folder, file or picture, a bad line or label is a one-line DataError naming the file."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: POPE folder not found")
    files: dict[str, Path] = {}
    for f in sorted(root.iterdir()):
        name = set_name(f.name)
        if name is None or not f.is_file():
            continue
        if name in files:
            raise DataError(
                f"{root}: two question files for POPE set '{name}': {files[name].name}, {f.name}"
            )
        files[name] = f
    if not files:
        wanted = ", ".join(f"coco_pope_{s}.json" for s in SAMPLINGS)
        raise DataError(f"{root}: no POPE question file ({wanted}; .jsonl is read too)")
    files = {name: files[name] for name in sorted(files, key=_order)}
    sets: dict[str, list[PopeQuestion]] = {}
    image_paths: dict[str, Path] = {}
    dirs = [root / d for d in IMAGE_DIRS if (root / d).is_dir()] + [root]
    for name, f in files.items():
        questions = []
        for where, obj in _records(f):
            q = _question(where, obj)
            if q.image not in image_paths:
                found = next((d / q.image for d in dirs if (d / q.image).is_file()), None)
                if found is None:
                    looked = ", ".join(str(d) for d in dirs)
                    raise DataError(f"{where}: image '{q.image}' not found (looked in {looked})")
                image_paths[q.image] = found
            questions.append(q)
        if not questions:
            raise DataError(f"{f}: no question")
        sets[name] = questions
    return Pope(str(root), sets, files, image_paths)
