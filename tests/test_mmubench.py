"""MMUBench: the fixture writes the documented layout and schema; the loader reads it back and
names every problem."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dsunlearn.data import mmubench
from dsunlearn.data.builtin import build_benchmark
from dsunlearn.data.fixtures import MIA_PROMPTS, write_mmubench_fixture
from dsunlearn.data.mmubench import COLUMNS, CONCEPTS_DIR, PARQUET_NAME, load_mmubench
from dsunlearn.data.vocab import IDENTITY_QUESTIONS
from dsunlearn.errors import DataError

C = 2
TESTS = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmubench_fixture(
        tmp_path_factory.mktemp("mmu") / "m", concepts=C, seed=0, test_images=TESTS
    )


def _file(root: Path) -> Path:
    return root / CONCEPTS_DIR / PARQUET_NAME


def _pixels(raw: bytes) -> bytes:
    return Image.open(io.BytesIO(raw)).convert("RGB").tobytes()


def test_layout_and_columns(root: Path, tmp_path: Path) -> None:
    import datasets

    assert tuple(pq.read_schema(_file(root)).names) == COLUMNS
    ds = datasets.load_dataset(
        str(root), data_dir=CONCEPTS_DIR, split="train", cache_dir=str(tmp_path)
    )
    assert isinstance(ds.features["train_image"], datasets.Image)
    assert isinstance(ds.features["test_images"].feature, datasets.Image)
    assert len(ds) == C


def test_every_field_round_trips(root: Path) -> None:
    bench = load_mmubench(str(root))
    raw = pq.read_table(_file(root)).to_pylist()
    assert [c.id for c in bench.concepts] == [r["concept_id"] for r in raw]
    for c, row in zip(bench.concepts, raw, strict=True):
        assert c.name == row["name"] and c.category == row["category"] == "person"
        assert c.aliases == json.loads(row["aliases"]) == [row["name"].split()[-1]]
        assert c.reveal_terms == [c.name, *c.aliases]
        assert c.train_image.mode == "RGB"
        assert c.train_image.tobytes() == _pixels(row["train_image"]["bytes"])
        assert len(c.test_images) == TESTS
        for im, r in zip(c.test_images, row["test_images"], strict=True):
            assert im.mode == "RGB" and im.tobytes() == _pixels(r["bytes"])
        assert c.probe_prompts == json.loads(row["probe_prompts"]) == list(IDENTITY_QUESTIONS)
        assert c.facts == [(f["question"], f["answer"]) for f in json.loads(row["facts"])]
        assert c.mia_prompts == json.loads(row["mia_prompts"]) == list(MIA_PROMPTS)
        jb = json.loads(row["jailbreak_prompts"])
        assert [(j.prompt, j.type, j.language, list(j.reveals)) for j in c.jailbreak] == [
            (j["prompt"], j["type"], j["language"], j["reveals"]) for j in jb
        ]
        assert {j.type for j in c.jailbreak} == set(mmubench.JAILBREAK_TYPES)
        assert {j.language for j in c.jailbreak} >= {"en", "es", "fr", "de"}
        facts = dict(c.facts)
        hops = [j for j in c.jailbreak if j.type == "multi_hop"]
        assert hops and all(set(j.reveals) <= set(facts.values()) for j in hops)
    assert bench.concept(raw[1]["concept_id"]).name == raw[1]["name"]
    with pytest.raises(DataError, match="no concept 'nobody'"):
        bench.concept("nobody")


def test_concepts_are_the_builtin_people(root: Path, tmp_path: Path) -> None:
    built = build_benchmark(tmp_path / "b", seed=0, entities=C, train_images=1, heldout_images=1)
    people = json.loads((built / "benchmark.json").read_text())["people"]
    got = json.loads((root / "fixture.json").read_text())["concepts"]
    assert got == people
    assert [c.name for c in load_mmubench(str(root)).concepts] == [
        p["name"] for p in people.values()
    ]


def test_fixture_is_deterministic(root: Path, tmp_path: Path) -> None:
    again = write_mmubench_fixture(tmp_path / "again", concepts=C, seed=0, test_images=TESTS)
    assert _file(again).read_bytes() == _file(root).read_bytes()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _write(tmp_path: Path, table: pa.Table, name: str = "bad") -> Path:
    bad = tmp_path / name
    (bad / CONCEPTS_DIR).mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(None), _file(bad))
    return bad


def _table(root: Path) -> pa.Table:
    return pq.read_table(_file(root))


def _replace(table: pa.Table, col: str, values: list, type_: pa.DataType | None = None) -> pa.Table:
    i = table.schema.get_field_index(col)
    return table.set_column(i, col, pa.array(values, type_ or table.schema.field(col).type))


def test_optional_columns_may_be_absent(root: Path, tmp_path: Path) -> None:
    bench = load_mmubench(str(_write(tmp_path, _table(root).drop_columns(list(mmubench.OPTIONAL)))))
    c = bench.concepts[0]
    assert c.aliases == [] and c.category == "" and c.facts == [] and c.reveal_terms == [c.name]


def test_missing_folder_and_column(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"{tmp_path}/{CONCEPTS_DIR}: folder not found"):
        load_mmubench(str(tmp_path))
    with pytest.raises(DataError, match="data path not found"):
        load_mmubench(str(tmp_path / "nowhere"))
    bad = _write(tmp_path, _table(root).drop_columns(["mia_prompts"]))
    with pytest.raises(DataError) as err:
        load_mmubench(str(bad))
    assert str(err.value) == f"{_file(bad)}: parquet is missing column 'mia_prompts'"


def test_wrong_type_is_named(root: Path, tmp_path: Path) -> None:
    table = _replace(_table(root), "test_images", ["x"] * C, pa.string())
    with pytest.raises(
        DataError, match="column 'test_images' has type string, expected a list of images"
    ):
        load_mmubench(str(_write(tmp_path, table)))


def test_malformed_json_is_named(root: Path, tmp_path: Path) -> None:
    table = _table(root)
    facts = table.column("facts").to_pylist()
    first = table.column("concept_id").to_pylist()[0]
    bad = _write(tmp_path, _replace(table, "facts", ["{oops", *facts[1:]]))
    with pytest.raises(DataError) as err:
        load_mmubench(str(bad))
    assert str(err.value).startswith(
        f"{bad}/{CONCEPTS_DIR} row 0 (concept {first}): column 'facts' is not valid JSON"
    )
    no_answer = json.dumps([{"question": "Where?"}])
    bad = _write(tmp_path, _replace(table, "facts", [no_answer, *facts[1:]]), "bad2")
    with pytest.raises(DataError, match=r"column 'facts' item 0 has no string 'answer'"):
        load_mmubench(str(bad))
    not_list = json.dumps({"prompt": "x"})
    bad = _write(tmp_path, _replace(table, "mia_prompts", [not_list] * C), "bad3")
    with pytest.raises(DataError, match=r"column 'mia_prompts' is not a list of strings"):
        load_mmubench(str(bad))


def test_bad_jailbreak_type_is_named(root: Path, tmp_path: Path) -> None:
    table = _table(root)
    jb = json.loads(table.column("jailbreak_prompts").to_pylist()[0])
    jb[1]["type"] = "roleplay"
    rest = table.column("jailbreak_prompts").to_pylist()[1:]
    bad = _write(tmp_path, _replace(table, "jailbreak_prompts", [json.dumps(jb), *rest]))
    with pytest.raises(DataError, match=r"'jailbreak_prompts' item 1 has type 'roleplay'"):
        load_mmubench(str(bad))


def test_training_image_must_not_be_a_test_image(root: Path, tmp_path: Path) -> None:
    table = _table(root)
    train = table.column("train_image").to_pylist()
    tests = table.column("test_images").to_pylist()
    tests[1] = [*tests[1], train[1]]
    bad = _write(tmp_path, _replace(table, "test_images", tests))
    with pytest.raises(DataError, match=r"row 1 \(concept P002\): the training image is also one"):
        load_mmubench(str(bad))
    no_tests = [[] for _ in tests]
    bad = _write(tmp_path, _replace(table, "test_images", no_tests), "bad2")
    with pytest.raises(DataError, match=r"column 'test_images' holds no image"):
        load_mmubench(str(bad))


def test_duplicate_concept_and_undecodable_image(root: Path, tmp_path: Path) -> None:
    table = _table(root)
    bad = _write(tmp_path, _replace(table, "concept_id", ["P001"] * C))
    with pytest.raises(DataError, match="concept_id 'P001' appears twice"):
        load_mmubench(str(bad))
    train = table.column("train_image").to_pylist()
    train[0] = {"bytes": b"garbage", "path": "x.png"}
    bad = _write(tmp_path, _replace(table, "train_image", train), "bad2")
    with pytest.raises(DataError, match=r"row 0 \(concept P001\): undecodable image"):
        load_mmubench(str(bad))


def test_hub_id_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_mmubench("someone/MMUBench")
    msg = str(err.value)
    assert msg.startswith("cannot load 'someone/MMUBench' from the Hugging Face hub: ")
    assert "\n" not in msg
