"""Learn-stage pieces: the cache key, history verification, augmentation."""

import numpy as np
import pytest
from PIL import Image

from dsunlearn.cache import vanilla_key
from dsunlearn.config import DataConfig, LearnConfig
from dsunlearn.data.augment import augment_image
from dsunlearn.errors import DsunlearnError
from dsunlearn.recipes.learn import compare_histories


def test_key_depends_on_seed_and_settings_not_on_paths():
    base = vanilla_key(LearnConfig())
    assert base.startswith("tiny-llava-seed0-e20-")
    assert vanilla_key(LearnConfig(data=DataConfig(seed=1))) != base
    other = LearnConfig()
    other.optim.lr = 2e-3
    assert vanilla_key(other) != base
    assert vanilla_key(LearnConfig(data=DataConfig(root="/elsewhere"), cache_dir="/x")) == base


def test_compare_histories():
    rec = [{"step": 250, "loss": 0.4, "forget_vqa_acc": 0.85, "retain_vqa_acc": 0.88}]
    compare_histories([{"step": 250, "loss": 0.41, "forget_vqa_acc": 0.86}], rec, tol=0.03)
    with pytest.raises(DsunlearnError, match="at step 250 forget_vqa_acc = 0.700"):
        compare_histories([{"step": 250, "forget_vqa_acc": 0.70}], rec, tol=0.03)
    with pytest.raises(DsunlearnError, match="loss = 0.6000, recorded 0.4000"):
        compare_histories([{"step": 250, "loss": 0.6, "forget_vqa_acc": 0.85}], rec, tol=0.03)
    with pytest.raises(DsunlearnError, match="no evaluation at step 500"):
        compare_histories([{"step": 500, "forget_vqa_acc": 0.9}], rec, tol=0.03)
    # Another CPU path: the loss is not compared, the accuracies still are.
    compare_histories([{"step": 250, "loss": 0.6, "forget_vqa_acc": 0.85}], rec, 0.05, False)
    with pytest.raises(DsunlearnError, match="forget_vqa_acc"):
        compare_histories([{"step": 250, "loss": 0.6, "forget_vqa_acc": 0.7}], rec, 0.05, False)


def test_augment_keeps_size_and_varies():
    img = Image.new("RGB", (32, 32), (200, 220, 240))
    img.paste((200, 30, 30), (10, 10, 22, 22))
    rng = np.random.default_rng(0)
    a, b = augment_image(img, rng), augment_image(img, rng)
    assert a.size == b.size == (32, 32)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    # still mostly the same picture: the red square is still there
    px = np.asarray(a).astype(int)
    red = (px[..., 0] > 150) & (px[..., 1] < 100)
    assert 80 < red.sum() < 200  # 144 pixels before rescaling


def test_gold_data_holds_no_forget_picture_and_every_fact(small_bench):
    """The gold model never sees a forget person's picture (training, held-out or validation
    renderings) but learns every person's text facts, the forget people's included."""
    from dsunlearn.data.examples import learn_examples, text_qa_examples, vqa_train_examples
    from dsunlearn.data.mllmu import load_benchmark

    bench = load_benchmark(str(small_bench))
    gold, vanilla = learn_examples(bench, gold=True), learn_examples(bench)
    forget_ids = bench.forget_ids
    forget_pixels = {
        im.tobytes()
        for r in [*bench.forget, *bench.test, *bench.val]
        if r.id in forget_ids
        for im in r.images
    }
    assert forget_pixels and len(forget_pixels) >= 3 * len(bench.forget)
    pictured = [e for e in gold if e.image is not None]
    assert pictured and not any(e.image.tobytes() in forget_pixels for e in pictured)
    assert {e.entity_id for e in pictured} == {r.id for r in bench.retain}
    texts = text_qa_examples(bench.forget + bench.retain)
    assert [e for e in gold if e.image is None] == texts  # every fact, forget people's too
    assert any(e.entity_id in forget_ids for e in texts)
    # the vanilla set is the gold set plus the forget people's pictured pairs, nothing else
    forget_pictured = vqa_train_examples(bench.forget)
    assert forget_pictured and len(vanilla) == len(gold) + len(forget_pictured)


def test_gold_key_and_folder_differ_from_the_vanilla_ones_only_by_the_flag():
    from dsunlearn.cache import gold_dir, vanilla_dir

    cfg = LearnConfig()
    assert vanilla_key(cfg) == "tiny-llava-seed0-e20-a1f76de313"  # the shipped model's key
    gold = gold_dir(cfg)
    assert gold.parent.name == "gold" and gold.name != vanilla_dir(cfg).name
    assert gold.name.startswith("tiny-llava-seed0-e20-")
