"""Validation vs test: model selection reads `split("val")`, the report `split("test")`, and the
two never share a picture or an evaluation item (built-in Val_Set, the hash rule for benchmarks
without one, and CLEAR's hash over pictures)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dsunlearn.data import builtin, clear, faces
from dsunlearn.data.benchmark import ITEM_TASKS, Benchmark, EntityRecord, split_records
from dsunlearn.data.builtin import build_benchmark, ensure_benchmark
from dsunlearn.data.fixtures import add_mllmu_celebrities, write_clear_fixture
from dsunlearn.data.mllmu import (
    FULL_DIR,
    PARQUET_NAME,
    TEST_DIR,
    VAL_DIR,
    load_benchmark,
    load_celebrities,
)
from dsunlearn.errors import ConfigError, DataError

# sha256[:16] of each split's parquet for build_benchmark(seed=0, entities=E): the shipped
# vanilla models were trained on these bytes, so adding Val_Set must not change them.
FROZEN = {
    20: {
        "Full_Set": "3014e32bb7717051",
        "Test_Set": "a9e6f859fc7dcb84",
        "forget_10": "cb6f2a0bed178bd2",
        "retain_90": "93541f6982ba2107",
    },
    6: {
        "Full_Set": "1a0db44dce35b41e",
        "Test_Set": "edf34acc402d54ee",
        "forget_10": "03d44777ceebc83f",
        "retain_90": "c4125ce463192d7b",
    },
}
MC_KINDS = ("Image_Textual_Questions", "Pure_Text_Questions")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("splits")
    return {e: build_benchmark(root / f"e{e}", seed=0, entities=e) for e in FROZEN}


@pytest.fixture(scope="module")
def no_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger built-in folder without Val_Set, with celebrities: the real benchmark's shape."""
    root = build_benchmark(
        tmp_path_factory.mktemp("noval") / "b",
        seed=0,
        entities=40,
        train_images=1,
        heldout_images=1,
        val_images=1,
    )
    shutil.rmtree(root / VAL_DIR)
    add_mllmu_celebrities(root, people=3)
    return root


def _rows(root: Path, split: str) -> list[dict]:
    return pq.read_table(root / split / PARQUET_NAME).to_pylist()


def _documented_in_val(rid: str, task: str, question: str, pct: int, seed: int) -> bool:
    """The rule as the docs state it, written out independently of the code under test."""
    digest = hashlib.sha256(f"{seed}|{rid}|{task}|{question}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < pct


# ---------------------------------------------------------------------------------------------
# Built-in Val_Set
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entities", sorted(FROZEN))
def test_existing_splits_keep_their_bytes(built: dict[int, Path], entities: int) -> None:
    root = built[entities]
    got = {
        split: hashlib.sha256((root / split / PARQUET_NAME).read_bytes()).hexdigest()[:16]
        for split in FROZEN[entities]
    }
    assert got == FROZEN[entities]
    assert builtin.GENERATOR_VERSION == 2


def test_val_pictures_are_new_pictures_of_everyone(built: dict[int, Path]) -> None:
    root = built[20]
    seen = {
        im["bytes"]
        for split in (FULL_DIR, TEST_DIR)
        for row in _rows(root, split)
        for im in row["images"]
    }
    val = _rows(root, VAL_DIR)
    assert [r["ID"] for r in val] == [r["ID"] for r in _rows(root, FULL_DIR)]
    pictures = [im["bytes"] for row in val for im in row["images"]]
    assert all(len(row["images"]) >= 2 and row["image"] == row["images"][0] for row in val)
    assert len(set(pictures)) == len(pictures) and not set(pictures) & seen


def test_a_colliding_rendering_is_drawn_again() -> None:
    identity = faces.choose_identities(1, np.random.default_rng(0))[0]
    first = builtin._render(identity, np.random.default_rng(7), 32)
    out = builtin._new_renders(identity, np.random.default_rng(7), 2, 32, taken={first})
    assert len(out) == 2 and first not in out and out[0] != out[1]


def test_a_repeated_mc_item_is_drawn_again() -> None:
    pool = ["a", "b", "c", "d"]  # the distractors are forced: only the order can differ
    first = builtin._mc("Q?", "a", pool, np.random.default_rng(3))
    again = builtin._mc("Q?", "a", pool, np.random.default_rng(3), avoid=first)
    assert again != first and sorted(again["Options"].values()) == pool
    assert again["Options"][again["Correct_Answer"]] == "a"


def test_val_mc_items_are_not_the_test_items(built: dict[int, Path]) -> None:
    for entities, root in built.items():
        test = {r["ID"]: r for r in _rows(root, TEST_DIR)}
        for v in _rows(root, VAL_DIR):
            t = test[v["ID"]]
            for kind in MC_KINDS:
                pairs = zip(
                    v["Classification_Task"][kind], t["Classification_Task"][kind], strict=True
                )
                for a, b in pairs:
                    assert a != b, (entities, v["ID"], a["Question"])
                    assert a["Question"] == b["Question"]
                    right = a["Options"][a["Correct_Answer"]]
                    assert right == b["Options"][b["Correct_Answer"]]
            same = ("biography", "metadata", "Generation_Task", "Mask_Task")
            assert {k: v[k] for k in same} == {k: t[k] for k in same}


def test_benchmark_json_and_ensure_rebuilds_a_folder_without_val_set(
    built: dict[int, Path], tmp_path: Path
) -> None:
    info = json.loads((built[6] / "benchmark.json").read_text())
    assert info["splits"]["val"] == VAL_DIR and info["val_images"] == 2
    old = tmp_path / "old"
    shutil.copytree(built[6], old)
    shutil.rmtree(old / VAL_DIR)
    del info["val_images"], info["splits"]["val"]  # what a build from before Val_Set wrote
    (old / "benchmark.json").write_text(json.dumps(info))
    ensure_benchmark(old, seed=0, entities=6)
    assert (old / VAL_DIR / PARQUET_NAME).is_file()
    with pytest.raises(ConfigError, match="validation"):
        build_benchmark(tmp_path / "x", entities=6, val_images=0)


# ---------------------------------------------------------------------------------------------
# Loader: Val_Set round trip
# ---------------------------------------------------------------------------------------------


def test_val_set_round_trip(built: dict[int, Path], tmp_path: Path) -> None:
    root = built[6]
    bench = load_benchmark(str(root))
    assert [r.id for r in bench.val] == [r["ID"] for r in _rows(root, VAL_DIR)]
    assert bench.split_rule.startswith(f"{VAL_DIR}/: 2 held-out pictures of every person")

    # Training reads exactly what it read before Val_Set existed.
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    shutil.rmtree(plain / VAL_DIR)
    before = load_benchmark(str(plain))
    assert (bench.forget, bench.retain, bench.test) == (before.forget, before.retain, before.test)

    val, test = bench.split("val"), bench.split("test")
    assert (val.view, test.view, bench.view) == ("val", "test", "")
    assert val.forget_ids == bench.forget_ids and val.test == []
    assert [r.id for r in val.retain] == [r.id for r in bench.retain]
    by_id = {r.id: r for r in bench.val}
    assert all(r is by_id[r.id] for r in (*val.forget, *val.retain))
    assert (test.forget, test.retain, test.test) == (bench.forget, bench.retain, bench.test)
    assert val.split_rule == test.split_rule == bench.split_rule
    for r in val.forget:  # the pictures model selection sees are none of the test pictures
        test_pixels = {
            np.asarray(im).tobytes()
            for rec in (*bench.forget, *bench.test)
            if rec.id == r.id
            for im in rec.images
        }
        assert not {np.asarray(im).tobytes() for im in r.images} & test_pixels
    assert val.split("val").forget == val.forget  # a view gives itself again


# ---------------------------------------------------------------------------------------------
# The hash rule (no Val_Set: the real MLLMU-Bench)
# ---------------------------------------------------------------------------------------------


def _assert_partition(
    records: list[EntityRecord],
    val: list[EntityRecord],
    test: list[EntityRecord],
    pct: int,
    seed: int,
) -> None:
    assert [r.id for r in val] == [r.id for r in test] == [r.id for r in records]
    for r, v, t in zip(records, val, test, strict=True):
        assert v.images is r.images and v.metadata is r.metadata
        for task in ITEM_TASKS:
            items = getattr(r, task)
            flags = [_documented_in_val(r.id, task, it.question, pct, seed) for it in items]
            assert getattr(v, task) == [it for it, f in zip(items, flags, strict=True) if f]
            assert getattr(t, task) == [it for it, f in zip(items, flags, strict=True) if not f]


def test_hash_rule_partitions_every_record_list(no_val: Path) -> None:
    bench = load_benchmark(str(no_val), val_pct=20, split_seed=0)
    assert bench.val == [] and bench.split_rule.startswith("hash: ")
    assert "'0|ID|task|question'" in bench.split_rule and "< 20" in bench.split_rule
    val, test = bench.split("val"), bench.split("test")
    for name in ("forget", "retain", "test"):
        _assert_partition(getattr(bench, name), getattr(val, name), getattr(test, name), 20, 0)
    celebs = load_celebrities(str(no_val))
    assert celebs
    _assert_partition(
        celebs, split_records(celebs, "val", 20, 0), split_records(celebs, "test", 20, 0), 20, 0
    )
    # The same person and question is on the same side in the forget rows and in Test_Set.
    held = {r.id: r for r in val.test}
    for r in val.forget:
        for task in ITEM_TASKS:
            assert getattr(r, task) == getattr(held[r.id], task)


def test_hash_share_and_seed(no_val: Path) -> None:
    bench = load_benchmark(str(no_val), val_pct=20, split_seed=0)

    def count(b: Benchmark) -> int:
        return sum(len(getattr(r, t)) for r in (*b.forget, *b.retain) for t in ITEM_TASKS)

    share = count(bench.split("val")) / count(bench)
    assert 0.15 < share < 0.25, share
    assert bench.split("val") == load_benchmark(str(no_val)).split("val")  # deterministic
    other = load_benchmark(str(no_val), split_seed=1).split("val")
    assert other.forget != bench.split("val").forget
    half = load_benchmark(str(no_val), val_pct=50).split("val")
    assert 0.45 < count(half) / count(bench) < 0.55


def test_split_errors(built: dict[int, Path], no_val: Path) -> None:
    bench = load_benchmark(str(built[6]))
    for bad in ("train", "Val", ""):
        with pytest.raises(DataError, match="unknown evaluation split") as err:
            bench.split(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="already the 'val' split"):
        bench.split("val").split("test")
    for pct in (0, 100, -5):
        with pytest.raises(DataError, match="val_pct must be between 1 and 99"):
            load_benchmark(str(no_val), val_pct=pct)
        with pytest.raises(DataError, match="val_pct"):
            split_records(bench.forget, "val", pct, 0)


def test_hub_val_set_is_optional(
    built: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id: Val_Set is read when the dataset has it, and "no such folder" means none."""
    import datasets
    from datasets.exceptions import DataFilesNotFoundError

    root = tmp_path / "hub"
    shutil.copytree(built[6], root)

    def fake_load_dataset(hub_id: str, data_dir: str, split: str) -> datasets.Dataset:
        folder = root / data_dir
        if not folder.is_dir():
            raise DataFilesNotFoundError(f"No (supported) data files found in {hub_id}")
        return datasets.Dataset.from_parquet(
            str(folder / PARQUET_NAME), keep_in_memory=True, cache_dir=str(tmp_path / "cache")
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)  # no local folder named "owner"
    assert len(load_benchmark("owner/bench").val) == 6
    shutil.rmtree(root / VAL_DIR)
    assert load_benchmark("owner/bench").val == []


# ---------------------------------------------------------------------------------------------
# CLEAR
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clear_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clear_fixture(
        tmp_path_factory.mktemp("clear") / "c", entities=12, images_per_person=4
    )


def _keys(split: clear.ClearSplit) -> list[bytes | str]:
    """What identifies each row: its pixels, or the question of a text-only row."""
    pictures = [r.image.tobytes() for r in (*split.captions, *split.choices)]
    return [*pictures, *(q.question for q in split.text_qa)]


def test_clear_val_and_test_partition_every_config(clear_root: Path) -> None:
    full_val = set(_keys(clear.load_clear(str(clear_root), "full+tofu", "val")))
    full_test = set(_keys(clear.load_clear(str(clear_root), "full+tofu", "test")))
    assert full_val and full_test and not full_val & full_test
    for config in clear.CONFIGS:
        every = _keys(clear.load_clear(str(clear_root), config))
        val = _keys(clear.load_clear(str(clear_root), config, "val"))
        test = _keys(clear.load_clear(str(clear_root), config, "test"))
        assert Counter(val + test) == Counter(every) and not set(val) & set(test), config
        if config.startswith(("forget", "retain")):  # the same picture, the same side
            assert set(val) <= full_val and set(test) <= full_test, config


def test_clear_share_seed_and_rule(clear_root: Path) -> None:
    def val_keys(pct: int = 20, seed: int = 0) -> list[bytes | str]:
        return _keys(clear.load_clear(str(clear_root), "full+tofu", "val", pct, seed))

    every = len(clear.load_clear(str(clear_root), "full+tofu"))
    assert 0.1 < len(val_keys()) / every < 0.3
    assert val_keys() == val_keys() and val_keys(seed=1) != val_keys()
    assert len(val_keys(pct=60)) > len(val_keys())
    rule = clear.split_rule(20, 0)
    assert "sha256" in rule and "< 20" in rule and "'0|'" in rule
    with pytest.raises(DataError, match="unknown evaluation split"):
        clear.load_clear(str(clear_root), "full", "train")
    with pytest.raises(DataError, match="val_pct must be between 1 and 99"):
        clear.load_clear(str(clear_root), "full", "val", val_pct=100)
