"""Config loading: YAML + key=value overrides, typed, unknown keys refused."""

import pytest

from dsunlearn.config import LearnConfig, MethodConfig, UnlearnConfig, config_hash, load_config
from dsunlearn.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nmethods: [ga]\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(UnlearnConfig, f, ["optim.lr=3e-4", "methods=[ga,npo]", "eval.max_items=5"])
    assert cfg.name == "x"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.methods == ["ga", "npo"]
    assert cfg.eval.max_items == 5
    assert cfg.optim.batch_size == 4  # default kept


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("optim.lr=abc", "config key 'optim.lr' must be a number"),
        ("optim.batch_size=2.5", "config key 'optim.batch_size' must be an integer"),
        ("eval.enabled=maybe", "config key 'eval.enabled' must be true or false"),
        ("noequals", "must look like key=value"),
        ("optim=3", "config key 'optim' must be a mapping"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(UnlearnConfig, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(UnlearnConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(UnlearnConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(UnlearnConfig, lst)


def test_hash_changes_with_settings():
    a, b = LearnConfig(), LearnConfig()
    assert config_hash(a) == config_hash(b)
    b.optim.lr = 5e-4
    assert config_hash(a) != config_hash(b)


def test_shipped_configs_load():
    cfg = load_config(UnlearnConfig, "configs/demo.yaml")
    assert set(cfg.methods) == {"ga", "graddiff", "kl_min", "npo", "siu", "mmunlearner"} | {
        "simnpo",
        "idkpo",
        "undial",
        "rmu",
        "manu",
    }
    assert cfg.method.mmu_mask.modules == "vision" and cfg.method.mmu_lr == 5e-4
    defaults = MethodConfig()  # the demo spells out the papers' defaults, and they agree
    keys = ["siu_alpha", "siu_beta", "siu_lr", "siu_batch_size", "siu_steps", "siu_loss"]
    keys += ["simnpo_beta", "simnpo_gamma", "idkpo_beta", "undial_gamma"]
    keys += ["rmu_layer", "rmu_steering", "rmu_alpha", "manu_prune_pct"]
    for key in keys:
        assert getattr(cfg.method, key) == getattr(defaults, key), key
    assert cfg.peft.lora.r == 0


def test_a_section_switch_is_short_for_its_enabled_key():
    """`audit=true` (as the docs write it) sets audit.enabled and keeps the section's settings,
    in either order with audit.<key> overrides."""
    from dsunlearn.config import UnlearnConfig, load_config

    for overrides in (
        ["audit=true", "audit.relearn_lr=0.001"],
        ["audit.relearn_lr=0.001", "audit=true"],
    ):
        cfg = load_config(UnlearnConfig, None, overrides)
        assert cfg.audit.enabled and cfg.audit.relearn_lr == 0.001
    cfg = load_config(UnlearnConfig, None, ["eval.every=4", "eval=false"])
    assert not cfg.eval.enabled and cfg.eval.every == 4
    assert not load_config(UnlearnConfig, None, []).audit.enabled
