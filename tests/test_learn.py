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
