"""Built-in benchmark generator, MLLMU-Bench loader and example flattening."""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dsunlearn.data import examples as ex
from dsunlearn.data.builtin import build_benchmark, ensure_benchmark
from dsunlearn.data.faces import MIN_DIFFERENT_ATTRIBUTES
from dsunlearn.data.mllmu import (
    COLUMNS,
    FULL_DIR,
    HF_FEATURES,
    MC_LETTERS,
    PARQUET_NAME,
    SCHEMA,
    TEST_DIR,
    VAL_DIR,
    load_benchmark,
)
from dsunlearn.data.vocab import FACTS, IDENTITY_QUESTION, IDENTITY_QUESTIONS
from dsunlearn.errors import DataError

N = 8
PCT = 25  # 2 of 8 people are forgotten
SPLITS = (f"forget_{PCT}", f"retain_{100 - PCT}", FULL_DIR, TEST_DIR, VAL_DIR)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_benchmark(
        tmp_path_factory.mktemp("b") / "bench", seed=0, entities=N, forget_pct=PCT
    )


def _table(bench: Path, split: str) -> pa.Table:
    return pq.read_table(bench / split / PARQUET_NAME)


def _rows(bench: Path, split: str) -> list[dict]:
    return _table(bench, split).to_pylist()


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_same_seed_gives_identical_bytes_other_seed_differs(bench: Path, tmp_path: Path) -> None:
    again = build_benchmark(tmp_path / "again", seed=0, entities=N, forget_pct=PCT)
    a, b = _files(bench), _files(again)
    assert sorted(a) == sorted(["benchmark.json", *(f"{s}/{PARQUET_NAME}" for s in SPLITS)])
    assert a == b
    other = _files(build_benchmark(tmp_path / "other", seed=1, entities=N, forget_pct=PCT))
    assert all(a[k] != other[k] for k in a)


def test_schema_is_mllmu_bench_layout(bench: Path) -> None:
    for split in SPLITS:
        files = list((bench / split).iterdir())
        assert [f.name for f in files] == [PARQUET_NAME]
        schema = pq.read_schema(files[0])
        assert tuple(schema.names) == COLUMNS
        assert schema.equals(SCHEMA)  # types, field by field
        assert json.loads(schema.metadata[b"huggingface"]) == {"info": {"features": HF_FEATURES}}
        assert schema.field("image").type == pa.struct(
            [("bytes", pa.binary()), ("path", pa.string())]
        )


def test_hf_features_match_the_arrow_schema() -> None:
    import datasets

    features = datasets.Features.from_dict(HF_FEATURES)
    assert features.arrow_schema.equals(SCHEMA)


def test_datasets_decodes_images(bench: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_parquet(
        str(bench / TEST_DIR / PARQUET_NAME),
        keep_in_memory=True,
        cache_dir=str(bench.parent / "hf-cache"),
    )
    row = ds[0]
    assert isinstance(row["image"], Image.Image)
    assert all(isinstance(im, Image.Image) for im in row["images"])
    assert row["image"].size == (32, 32)
    assert isinstance(row["Classification_Task"]["Image_Textual_Questions"][0]["Options"], dict)


def test_splits_are_disjoint_and_complete(bench: Path) -> None:
    ids = {s: [r["ID"] for r in _rows(bench, s)] for s in SPLITS}
    forget, retain = set(ids[SPLITS[0]]), set(ids[SPLITS[1]])
    assert len(forget) == round(N * PCT / 100) and not forget & retain
    assert forget | retain == set(ids[FULL_DIR]) == set(ids[TEST_DIR]) == set(ids[VAL_DIR])
    assert len(ids[FULL_DIR]) == len(set(ids[FULL_DIR])) == N
    info = json.loads((bench / "benchmark.json").read_text())
    assert info["forget_ids"] == ids[SPLITS[0]]
    assert (info["seed"], info["entities"], info["forget_pct"]) == (0, N, PCT)
    assert info["splits"]["val"] == VAL_DIR


def test_people_names_and_facts(bench: Path) -> None:
    bios = [json.loads(r["biography"]) for r in _rows(bench, FULL_DIR)]
    firsts = [b["Name"].split()[0] for b in bios]
    lasts = [b["Name"].split()[-1] for b in bios]
    assert len(set(firsts)) == len(set(lasts)) == N  # a name token identifies one person
    for b in bios:
        assert list(b) == ["Name", *(f.key for f in FACTS)]
        assert len(b) - 1 >= 5
    for f in FACTS:
        counts = Counter(b[f.key] for b in bios)
        assert max(counts.values()) <= math.ceil(N / len(f.values)) + 1
        assert set(counts) <= set(f.values)


def test_value_spread_with_many_people(tmp_path: Path) -> None:
    n = 30
    root = build_benchmark(tmp_path / "big", seed=3, entities=n, train_images=1, heldout_images=1)
    bios = [json.loads(r["biography"]) for r in _rows(root, FULL_DIR)]
    for f in FACTS:
        assert max(Counter(b[f.key] for b in bios).values()) <= math.ceil(n / len(f.values)) + 1
    people = json.loads((root / "benchmark.json").read_text())["people"]
    looks = [tuple(p["identity"].values()) for p in people.values()]
    for i in range(n):
        for j in range(i):
            assert sum(a != b for a, b in zip(looks[i], looks[j], strict=True)) >= (
                MIN_DIFFERENT_ATTRIBUTES
            )


def test_images_train_vs_heldout(bench: Path) -> None:
    train = {r["ID"]: r for r in _rows(bench, FULL_DIR)}
    test = {r["ID"]: r for r in _rows(bench, TEST_DIR)}
    all_train = [_pixels(im["bytes"]) for r in train.values() for im in r["images"]]
    for pid, row in test.items():
        assert len(train[pid]["images"]) + len(row["images"]) >= 6
        assert train[pid]["image"] == train[pid]["images"][0]
        assert row["image"] == row["images"][0]
        for im in row["images"]:
            px = _pixels(im["bytes"])
            assert px.shape == (32, 32, 3)
            assert not any(np.array_equal(px, t) for t in all_train)
    # renderings of one person differ from each other too
    first = [_pixels(im["bytes"]) for im in next(iter(train.values()))["images"]]
    assert not np.array_equal(first[0], first[1])


def test_tasks_content(bench: Path) -> None:
    letters_used = Counter()
    for row in _rows(bench, FULL_DIR):
        bio = json.loads(row["biography"])
        meta = json.loads(row["metadata"])
        n_id = len(IDENTITY_QUESTIONS)
        assert meta[:n_id] == [{"Question": q, "Answer": bio["Name"]} for q in IDENTITY_QUESTIONS]
        assert {m["Answer"] for m in meta[n_id:]} <= set(bio.values())
        assert len(meta) == n_id + len(FACTS)
        cls = row["Classification_Task"]
        mcs = cls["Image_Textual_Questions"] + cls["Pure_Text_Questions"]
        assert len(cls["Image_Textual_Questions"]) == 1 + len(FACTS)
        assert len(cls["Pure_Text_Questions"]) == len(FACTS)
        for mc in mcs:
            options = [mc["Options"][k] for k in MC_LETTERS]
            assert len(set(options)) == 4
            letters_used[mc["Correct_Answer"]] += 1
        assert mcs[0]["Options"][mcs[0]["Correct_Answer"]] == bio["Name"]
        for f, mc in zip(FACTS, cls["Image_Textual_Questions"][1:], strict=True):
            assert mc["Question"] == f.image_question
            assert mc["Options"][mc["Correct_Answer"]] == bio[f.key]
            assert set(mc["Options"].values()) <= set(f.values)
        for f, mc in zip(FACTS, cls["Pure_Text_Questions"], strict=True):
            assert mc["Question"] == f.text_question.format(name=bio["Name"])
            assert mc["Options"][mc["Correct_Answer"]] == bio[f.key]
        types = Counter(g["Type"] for g in row["Generation_Task"])
        assert types == {"Image_Textual": 1 + len(FACTS), "Pure_Text": len(FACTS)}
        for c in row["Mask_Task"]:
            assert "__" in c["Question"] and c["Ground_Truth"] in bio.values()
    assert set(letters_used) == set(MC_LETTERS)  # answers are shuffled


def test_loader_round_trip(bench: Path) -> None:
    b = load_benchmark(str(bench), forget_pct=PCT)
    assert b.source == str(bench)
    full = {r["ID"]: r for r in _rows(bench, FULL_DIR)}
    assert [r.id for r in b.forget] == [r["ID"] for r in _rows(bench, SPLITS[0])]
    assert len(b.retain) == N - len(b.forget) and len(b.test) == N
    assert [r.id for r in b.test_forget] == [r.id for r in b.forget]
    rec = b.forget[0]
    row = full[rec.id]
    bio = json.loads(row["biography"])
    assert rec.name == bio["Name"] and rec.biography == bio
    assert len(rec.images) == len(row["images"])
    assert all(im.mode == "RGB" for im in rec.images)
    assert np.array_equal(np.asarray(rec.images[0]), _pixels(row["image"]["bytes"]))
    assert rec.metadata == [(m["Question"], m["Answer"]) for m in json.loads(row["metadata"])]
    mc = rec.mc_image[0]
    raw = row["Classification_Task"]["Image_Textual_Questions"][0]
    assert mc.question == IDENTITY_QUESTION and mc.options[mc.answer_index] == rec.name
    assert mc.options == [raw["Options"][k] for k in MC_LETTERS]
    assert len(rec.mc_text) == len(FACTS)
    assert [g.ground_truth for g in rec.gen] == [g["Ground_Truth"] for g in row["Generation_Task"]]
    assert [c.question for c in rec.cloze] == [c["Question"] for c in row["Mask_Task"]]
    test_rec = next(r for r in b.test if r.id == rec.id)
    assert not np.array_equal(np.asarray(test_rec.images[0]), np.asarray(rec.images[0]))


def test_loader_accepts_json_string_columns(bench: Path, tmp_path: Path) -> None:
    """The published dataset may store nested columns as JSON and have no `images` column."""
    root = tmp_path / "real"
    shutil.copytree(bench, root)
    for split in SPLITS:
        path = root / split / PARQUET_NAME
        t = pq.read_table(path)
        for col in ("Classification_Task", "Generation_Task", "Mask_Task"):
            t = t.set_column(
                t.schema.get_field_index(col),
                col,
                pa.array([json.dumps(v) for v in t[col].to_pylist()], pa.string()),
            )
        if split != TEST_DIR:
            t = t.drop(["images"])
        bio = [json.loads(s) for s in t["biography"].to_pylist()]
        for b in bio:
            del b["Name"]  # then the ID stands in for the name
        t = t.set_column(
            t.schema.get_field_index("biography"),
            "biography",
            pa.array([json.dumps(b) for b in bio], pa.string()),
        )
        pq.write_table(t, path)
    b = load_benchmark(str(root), forget_pct=PCT)
    ref = load_benchmark(str(bench), forget_pct=PCT)
    r, s = b.forget[0], ref.forget[0]
    assert r.name == r.id and len(r.images) == 1
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(s.images[0]))
    assert (r.mc_image, r.mc_text, r.gen, r.cloze) == (s.mc_image, s.mc_text, s.gen, s.cloze)
    assert len(b.test[0].images) == len(ref.test[0].images)


def test_loader_errors(bench: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(bench, root)
    with pytest.raises(DataError, match="forget_10"):  # default pct: no such folder
        load_benchmark(str(root))
    path = root / SPLITS[0] / PARQUET_NAME
    pq.write_table(pq.read_table(path).drop(["metadata"]), path)
    with pytest.raises(DataError) as err:
        load_benchmark(str(root), forget_pct=PCT)
    assert str(err.value) == f"{root / SPLITS[0]}: parquet is missing column 'metadata'"
    shutil.rmtree(root / TEST_DIR)
    with pytest.raises(DataError, match="Test_Set"):
        load_benchmark(str(root), forget_pct=PCT)
    with pytest.raises(DataError, match="data path not found"):
        load_benchmark(str(tmp_path / "does" / "not" / "exist"))


def test_loader_hub_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    # both libraries read the variable at import time
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named MLLMMU
    with pytest.raises(DataError) as err:
        load_benchmark("MLLMMU/MLLMU-Bench")
    msg = str(err.value)
    assert msg.startswith("cannot load 'MLLMMU/MLLMU-Bench' from the Hugging Face hub: ")
    assert "\n" not in msg


def test_ensure_benchmark_reuses_matching_build(tmp_path: Path) -> None:
    out = tmp_path / "e"
    ensure_benchmark(out, entities=4, train_images=1, heldout_images=1)
    stamp = (out / "benchmark.json").stat().st_mtime_ns
    ensure_benchmark(out, entities=4, train_images=1, heldout_images=1)
    assert (out / "benchmark.json").stat().st_mtime_ns == stamp
    ensure_benchmark(out, entities=5, train_images=1, heldout_images=1)
    assert json.loads((out / "benchmark.json").read_text())["entities"] == 5


def test_examples(bench: Path) -> None:
    b = load_benchmark(str(bench), forget_pct=PCT)
    n_f = len(b.forget)
    vqa = ex.vqa_train_examples(b.forget)
    assert len(vqa) == n_f * 6 * (len(IDENTITY_QUESTIONS) + len(FACTS))
    assert all(e.image is not None for e in vqa)
    assert vqa[0].question == IDENTITY_QUESTION and vqa[0].answer == b.forget[0].name
    text = ex.text_qa_examples(b.forget)
    assert len(text) == n_f * len(FACTS) and all(e.image is None for e in text)
    assert all(e.question.startswith(("Where", "What", "In", "Who")) for e in text)
    mc = ex.mc_vqa_examples(b.test_forget)
    assert len(mc) == n_f * 2 * (1 + len(FACTS))
    assert {id(e.image) for e in mc} == {id(im) for r in b.test_forget for im in r.images}
    mct = ex.mc_text_examples(b.retain)
    assert len(mct) == len(b.retain) * len(FACTS) and all(len(e.options) == 4 for e in mct)
    gen = ex.gen_vqa_examples(b.forget)
    assert len(gen) == n_f * (1 + len(FACTS))
    assert all(e.image is b.forget[0].images[0] for e in gen[: 1 + len(FACTS)])
    assert len(ex.cloze_examples(b.forget)) == n_f * 2 * len(FACTS)

    items = list(range(100))
    sub = ex.subsample(items, 10, seed=1)
    assert sub == sorted(sub) and len(sub) == 10 and sub == ex.subsample(items, 10, seed=1)
    assert sub != ex.subsample(items, 10, seed=2)
    assert ex.subsample(items, 0, seed=1) == items
    assert ex.subsample(items, 500, seed=1) == items
