"""CLEAR: the fixture writes the hub's layout and schema; the loader reads it back and names
every problem."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dsunlearn.data import clear
from dsunlearn.data.builtin import build_benchmark
from dsunlearn.data.clear import CONFIGS, PARQUET_NAME, config_kind, load_clear
from dsunlearn.data.fixtures import fictitious_people, forget_count, write_clear_fixture
from dsunlearn.errors import DataError

N = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clear_fixture(tmp_path_factory.mktemp("clear") / "c", entities=N, seed=0)


def _rows(root: Path, config: str) -> list[dict]:
    return pq.read_table(root / config / PARQUET_NAME).to_pylist()


def _pixels(raw: bytes) -> bytes:
    return Image.open(io.BytesIO(raw)).convert("RGB").tobytes()


def test_layout_and_columns_are_the_hubs(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CONFIGS)
    for config in CONFIGS:
        files = sorted((root / config).iterdir())
        assert [f.name for f in files] == [PARQUET_NAME]
        schema = pq.read_schema(files[0])
        assert tuple(schema.names) == clear.COLUMNS[config_kind(config)], config
    assert clear.COLUMNS["tofu"] == ("image", "caption", "question", "answer")  # no `name`
    card = (root / "README.md").read_text()
    assert "- config_name: forget05_perturbed" in card
    assert "path: forget05_perturbed/train-*" in card


def test_plain_datasets_reads_it_like_the_hub_repo(root: Path, tmp_path: Path) -> None:
    import datasets

    for config in ("forget01+tofu", "retain_perturbed", "real_world"):
        ds = datasets.load_dataset(str(root), config, split="train", cache_dir=str(tmp_path))
        assert list(ds.column_names) == list(clear.COLUMNS[config_kind(config)])
        assert isinstance(ds.features["image"], datasets.Image)
        assert len(ds) == len(_rows(root, config))


def test_every_field_round_trips(root: Path) -> None:
    for config in CONFIGS:
        split = load_clear(str(root), config)
        raw = _rows(root, config)
        assert split.config == config and split.kind == config_kind(config)
        assert len(split) == len(raw)
        if split.kind in ("real_faces", "real_world"):
            for rec, row in zip(split.choices, raw, strict=True):
                assert rec.answer == row["answer"] and rec.options == row["options"]
                assert rec.question == row.get("question")
                assert rec.choices == [row["answer"], *row["options"]]
                assert rec.image.mode == "RGB"
                assert rec.image.tobytes() == _pixels(row["image"]["bytes"])
            continue
        pictures = [r for r in raw if r["image"] is not None]
        texts = [r for r in raw if r["image"] is None]
        assert [(q.question, q.answer) for q in split.text_qa] == [
            (r["question"], r["answer"]) for r in texts
        ]
        for rec, row in zip(split.captions, pictures, strict=True):
            assert rec.caption == row["caption"]
            assert rec.name == row.get("name")
            assert rec.paraphrased_caption == row.get("paraphrased_caption")
            assert rec.perturbed_captions == (row.get("perturbed_captions") or [])
            assert rec.perturbed_names == (row.get("perturbed_names") or [])
            assert rec.image.mode == "RGB" and rec.image.size == (32, 32)
            assert rec.image.tobytes() == _pixels(row["image"]["bytes"])


def test_splits_partition_the_people(root: Path) -> None:
    full = load_clear(str(root), "full").names
    assert len(full) == N
    previous: list[str] = []
    for pct in clear.FORGET_PCTS:
        forget = load_clear(str(root), clear.forget_config(pct)).names
        retain = load_clear(str(root), clear.retain_config(pct)).names
        assert len(forget) == forget_count(N, pct)
        assert sorted(forget + retain) == sorted(full) and not set(forget) & set(retain)
        assert set(previous) <= set(forget)  # nested, as in TOFU
        previous = forget
        perturbed = load_clear(str(root), clear.forget_config(pct) + "_perturbed")
        assert perturbed.names == forget
        for row in perturbed.captions:
            assert len(row.perturbed_names) == 3 and row.name not in row.perturbed_names
            assert len(row.perturbed_captions) == 3 and row.caption not in row.perturbed_captions
        tofu = load_clear(str(root), clear.forget_config(pct) + "+tofu")
        assert tofu.text_qa and all(any(n in q.question for n in forget) for q in tofu.text_qa)
    assert (
        load_clear(str(root), "retain_perturbed").names == load_clear(str(root), "retain90").names
    )
    faces = load_clear(str(root), "real_faces").choices
    assert faces and not {f.answer for f in faces} & set(full)
    assert all(f.answer not in f.options and len(f.options) == 3 for f in faces)


def test_people_are_the_builtin_benchmarks(root: Path, tmp_path: Path) -> None:
    built = build_benchmark(tmp_path / "b", seed=0, entities=N, train_images=1, heldout_images=1)
    want = json.loads((built / "benchmark.json").read_text())["people"]
    got = json.loads((root / "fixture.json").read_text())["people"]
    assert got == want
    people, _, _ = fictitious_people(N, seed=0)
    assert [p.name for p in people] == [want[p.id]["name"] for p in people]
    bios = {r["ID"]: json.loads(r["biography"]) for r in _rows(built, "Full_Set")}
    assert {p.id: {"Name": p.name, **p.facts} for p in people} == bios


def test_fixture_is_deterministic(root: Path, tmp_path: Path) -> None:
    again = write_clear_fixture(tmp_path / "again", entities=N, seed=0)
    for config in ("forget10_perturbed", "real_faces"):
        a = (root / config / PARQUET_NAME).read_bytes()
        assert a == (again / config / PARQUET_NAME).read_bytes()
    other = write_clear_fixture(tmp_path / "other", entities=N, seed=1)
    assert (root / "full" / PARQUET_NAME).read_bytes() != (
        other / "full" / PARQUET_NAME
    ).read_bytes()


# ---------------------------------------------------------------------------------------------
# Errors: each names the problem and where it is
# ---------------------------------------------------------------------------------------------


def _one_config(root: Path, tmp_path: Path, config: str, table: pa.Table) -> Path:
    """A new CLEAR folder holding only `config`, written from `table` (no `datasets` metadata,
    so that an altered column is not contradicted by it)."""
    bad = tmp_path / "bad"
    (bad / config).mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(None), bad / config / PARQUET_NAME)
    return bad


def _table(root: Path, config: str) -> pa.Table:
    return pq.read_table(root / config / PARQUET_NAME)


def test_unknown_config_and_missing_folder(root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown CLEAR config 'forget02'"):
        load_clear(str(root), "forget02")
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "forget05")
    with pytest.raises(DataError) as err:
        load_clear(str(copy), "forget05")
    assert str(err.value).startswith(f"{copy / 'forget05'}: config folder not found")
    (copy / "forget05").mkdir()
    with pytest.raises(DataError, match="forget05: no parquet file"):
        load_clear(str(copy), "forget05")
    with pytest.raises(DataError, match="data path not found"):
        load_clear(str(tmp_path / "nowhere"), "full")


def test_missing_column_is_named(root: Path, tmp_path: Path) -> None:
    config = "forget01_perturbed"
    bad = _one_config(
        root, tmp_path, config, _table(root, config).drop_columns(["perturbed_names"])
    )
    with pytest.raises(DataError) as err:
        load_clear(str(bad), config)
    msg = str(err.value)
    assert msg.startswith(
        f"{bad / config / PARQUET_NAME}: parquet is missing column 'perturbed_names'"
    )
    assert "\n" not in msg


def test_wrong_type_is_named(root: Path, tmp_path: Path) -> None:
    config = "forget01"
    table = _table(root, config)
    table = table.set_column(2, "name", pa.array(range(table.num_rows), pa.int64()))
    bad = _one_config(root, tmp_path, config, table)
    with pytest.raises(
        DataError,
        match=r"forget01/train-00000-of-00001\.parquet: column 'name' "
        r"has type int64, expected string",
    ):
        load_clear(str(bad), config)


def test_list_columns_may_be_json_strings(root: Path, tmp_path: Path) -> None:
    config = "real_faces"
    table = _table(root, config)
    as_json = [json.dumps(o) for o in table.column("options").to_pylist()]
    good = _one_config(root, tmp_path, config, table.set_column(2, "options", pa.array(as_json)))
    assert [r.options for r in load_clear(str(good), config).choices] == [
        r["options"] for r in table.to_pylist()
    ]
    broken = ["[not json", *as_json[1:]]
    shutil.rmtree(good)
    bad = _one_config(root, tmp_path, config, table.set_column(2, "options", pa.array(broken)))
    with pytest.raises(DataError) as err:
        load_clear(str(bad), config)
    assert str(err.value).startswith(f"{bad}/real_faces row 0: column 'options' is not valid JSON")


def test_undecodable_image_is_named(root: Path, tmp_path: Path) -> None:
    config = "retain99"
    table = _table(root, config)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": b"not a png", "path": "x.png"}
    table = table.set_column(0, "image", pa.array(images, table.schema.field("image").type))
    bad = _one_config(root, tmp_path, config, table)
    with pytest.raises(DataError, match=r"retain99 row 1: undecodable image"):
        load_clear(str(bad), config)


def test_hub_id_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named therem
    with pytest.raises(DataError) as err:
        load_clear(clear.HUB_ID, "forget05")
    msg = str(err.value)
    assert msg.startswith(
        "cannot load 'therem/CLEAR' config 'forget05' from the Hugging Face hub: "
    )
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------
# Training on CLEAR (data.benchmark: clear)
# ---------------------------------------------------------------------------------------------


def test_training_benchmark_gives_each_picture_its_own_caption(root: Path) -> None:
    """forget10/retain90 -> the Benchmark the methods train on: one (prompt, caption) example
    per picture row, never a caption with another picture; the +tofu text QA per person."""
    from dsunlearn.data.clear import CAPTION_PROMPT, load_clear_benchmark
    from dsunlearn.data.examples import learn_examples, text_qa_examples, vqa_train_examples
    from dsunlearn.eval.benchmarks.clear import CAPTION_PROMPT as EVAL_PROMPT

    bench = load_clear_benchmark(str(root), forget_pct=10)
    for records, config in ((bench.forget, "forget10"), (bench.retain, "retain90")):
        rows = load_clear(str(root), config).captions
        assert [r.name for r in records] == list(dict.fromkeys(r.name for r in rows))
        examples = vqa_train_examples(records)
        assert [(e.question, e.answer, e.entity_id) for e in examples] == [
            (CAPTION_PROMPT, r.caption, r.name) for r in rows
        ]
        assert [_pixels_of(e.image) for e in examples] == [_pixels_of(r.image) for r in rows]
        tofu = load_clear(str(root), config + "+tofu").text_qa
        texts = text_qa_examples(records)
        assert [(t.question, t.answer) for t in texts] == [(q.question, q.answer) for q in tofu]
        assert all(records_by(records)[t.entity_id].name in t.question for t in texts)
    assert CAPTION_PROMPT == EVAL_PROMPT  # the MIA's members are the trained pairs
    assert len(bench.forget) == forget_count(N, 10) and bench.test == []
    gold = learn_examples(bench, gold=True)
    assert {e.entity_id for e in gold if e.image is not None} == {r.id for r in bench.retain}


def records_by(records: list) -> dict:
    return {r.id: r for r in records}


def _pixels_of(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def test_training_benchmark_bad_input_is_one_line(root: Path, tmp_path: Path) -> None:
    from dsunlearn.config import DataConfig
    from dsunlearn.data.clear import load_clear_benchmark
    from dsunlearn.engine.dist import DistInfo
    from dsunlearn.errors import ConfigError
    from dsunlearn.recipes.common import prepare_benchmark

    partial = tmp_path / "partial"
    for config in ("forget10", "forget10+tofu"):
        shutil.copytree(root / config, partial / config)
    with pytest.raises(DataError, match=r"retain90: config folder not found"):
        load_clear_benchmark(str(partial), forget_pct=10)
    with pytest.raises(DataError, match="forget percentage must be one of"):
        load_clear_benchmark(str(root), forget_pct=15)
    info = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    with pytest.raises(ConfigError, match="set data.benchmark=clear"):
        prepare_benchmark(DataConfig(path=str(root), forget_pct=10), info)
    with pytest.raises(ConfigError, match="data.benchmark must be one of"):
        prepare_benchmark(DataConfig(path=str(root), benchmark="tofu"), info)
    with pytest.raises(ConfigError, match="needs data.path"):
        prepare_benchmark(DataConfig(benchmark="clear"), info)
    bench = prepare_benchmark(DataConfig(path=str(root), benchmark="clear", forget_pct=5), info)
    assert len(bench.forget) == forget_count(N, 5)


def test_unlearn_trains_on_clear(tmp_path: Path, root: Path, random_vanilla: Path) -> None:
    """A real `dsunlearn unlearn` on the CLEAR fixture: GA, 1 rank, 2 steps, CLEAR's protocol."""
    from tests.conftest import run_cli, unlearn_args

    args = unlearn_args(
        tmp_path,
        root,
        random_vanilla,
        "methods=[ga]",
        "data.benchmark=clear",
        "eval.benchmark=clear",
        "optim.steps=2",
        "optim.batch_size=2",
        "eval.every=0",
        "eval.max_items=4",
        name="run",
    )
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["benchmark"]["forget_pct"] == 10 and "ga" in report["methods"]
    assert "forget_name_mc_acc" in report["methods"]["ga"]
