"""MMBench (Liu et al. 2023) in its published TSV layout.

One tab-separated file (pandas' `to_csv(sep="\\t")` quoting) with a header row:

    index  question  hint  A  B  C  D  answer  category  l2-category  split  image  ...

- `index`: an integer id; `question`; `hint` (context, often empty);
- `A` ... `D` (more letters are read if present): the options, as many as the question has;
  the unused ones are empty (`nan` as pandas writes it), always the last ones;
- `answer`: the right option's letter (the test TSVs hide it: only a dev TSV can be scored);
- `category` (20 abilities, e.g. attribute_recognition), `l2-category` (6), `split`: optional;
- `image`: the picture, base64-encoded. VLMEvalKit's TSVs also carry each question's circular
  copies (options rotated) as rows `index + k * 1_000_000` whose `image` is the original's
  index: those rows are left out here, the circular evaluation rotates the options itself.

Pictures are decoded only when asked for (`MMBench.image`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dsunlearn.errors import DataError

LETTERS = string.ascii_uppercase
REQUIRED = ("index", "question", "A", "B", "answer", "image")
EMPTY = ("", "nan", "NaN")  # what pandas writes (and reads back as missing) for NaN
COPY_OFFSET = 1_000_000  # VLMEvalKit's circular copies: index + k * COPY_OFFSET
_MAX_REFERENCE = 64  # an `image` this short is another row's index (VLMEvalKit's convention)


@dataclass(frozen=True)
class MMBenchQuestion:
    index: int
    question: str
    hint: str  # "" when the row has none
    options: tuple[str, ...]  # A, B, ... in order, the empty ones dropped
    answer: int  # position of the right option in `options`
    category: str = ""
    l2_category: str = ""
    split: str = ""

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass
class MMBench:
    source: str  # the TSV file
    questions: list[MMBenchQuestion]
    images: dict[int, str] = field(default_factory=dict)  # index -> base64 (or an index)
    copies_skipped: int = 0  # circular copies in the file, left out

    def image(self, index: int) -> Image.Image:
        """Question `index`'s picture (RGB), decoded now; a bad one is a one-line DataError."""
        raw = self.images[index]
        seen = {index}
        while len(raw) <= _MAX_REFERENCE and raw.isdigit() and int(raw) in self.images:
            ref = int(raw)
            if ref in seen:
                raise DataError(f"{self.source} row index {index}: image references loop")
            seen.add(ref)
            raw = self.images[ref]
        try:
            return Image.open(io.BytesIO(base64.b64decode(raw, validate=False))).convert("RGB")
        except (OSError, ValueError, binascii.Error) as e:
            raise DataError(
                f"{self.source} row index {index}: undecodable image ({type(e).__name__})"
            ) from e


def find_tsv(path: str | Path) -> Path:
    """`path` itself, or the one .tsv file in folder `path`."""
    p = Path(path)
    if p.is_dir():
        tsvs = sorted(p.glob("*.tsv"))
        if len(tsvs) != 1:
            found = ", ".join(t.name for t in tsvs) or "none"
            raise DataError(f"{p}: needs exactly one MMBench .tsv file, found {found}")
        return tsvs[0]
    if not p.is_file():
        raise DataError(f"{p}: MMBench TSV not found")
    return p


def _cell(row: dict[str, str | None], col: str) -> str:
    value = (row.get(col) or "").strip()
    return "" if value in EMPTY else value


def _options(row: dict[str, str | None], letters: list[str], where: str) -> tuple[str, ...]:
    values = [_cell(row, c) for c in letters]
    n = next((i for i, v in enumerate(values) if not v), len(values))
    if any(values[n:]):
        later = letters[n + next(i for i, v in enumerate(values[n:]) if v)]
        raise DataError(f"{where}: option {letters[n]} is empty but option {later} is not")
    if n < 2:
        raise DataError(f"{where}: needs at least options A and B")
    return tuple(values[:n])


def load_mmbench(path: str | Path) -> MMBench:
    """The questions of an MMBench TSV (a file, or a folder holding one), circular copies left
    out. A missing file or column, an empty question, an answer that is not one of the row's
    option letters or a repeated index is a one-line DataError naming the file."""
    tsv = find_tsv(path)
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # base64 pictures are long
    try:
        with tsv.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            header = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = header
            for col in REQUIRED:
                if col not in header:
                    hint = (
                        " (MMBench's test TSVs hide the answers: score a dev TSV)"
                        if col == "answer"
                        else ""
                    )
                    raise DataError(f"{tsv}: missing column '{col}'{hint}")
            letters = [c for c in LETTERS if c in header]
            letters = letters[: next((i for i, c in enumerate(letters) if c != LETTERS[i]), None)]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{tsv}: unreadable TSV ({type(e).__name__}: {e})") from e
    questions: list[MMBenchQuestion] = []
    images: dict[int, str] = {}
    copies = 0
    for n, row in enumerate(rows, start=1):
        raw_index = _cell(row, "index")
        try:
            index = int(float(raw_index))
        except (ValueError, OverflowError):
            raise DataError(f"{tsv} row {n}: index must be an integer, got {raw_index!r}") from None
        where = f"{tsv} row index {index}"
        if index >= COPY_OFFSET:
            copies += 1
            continue
        if index in images:
            raise DataError(f"{where}: index appears twice")
        question = _cell(row, "question")
        if not question:
            raise DataError(f"{where}: empty question")
        image = _cell(row, "image")
        if not image:
            raise DataError(f"{where}: empty image")
        options = _options(row, letters, where)
        answer = _cell(row, "answer")
        if len(answer) != 1 or answer not in LETTERS[: len(options)]:
            raise DataError(
                f"{where}: answer {answer!r} is not one of its option letters "
                f"{LETTERS[0]}-{LETTERS[len(options) - 1]}"
            )
        images[index] = image
        questions.append(
            MMBenchQuestion(
                index=index,
                question=question,
                hint=_cell(row, "hint"),
                options=options,
                answer=LETTERS.index(answer),
                category=_cell(row, "category"),
                l2_category=_cell(row, "l2-category"),
                split=_cell(row, "split"),
            )
        )
    if not questions:
        raise DataError(f"{tsv}: no question")
    return MMBench(str(tsv), questions, images, copies)
