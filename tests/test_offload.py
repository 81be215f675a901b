"""Optimizer offload: the shipped DeepSpeed configs, and the CPU Adam op that it needs.

The 2-rank checks under offload live beside their non-offload versions: the masked update in
tests/test_saliency.py, exact resume in tests/test_resume.py."""

from __future__ import annotations

import pytest

from dsunlearn.engine.ds_config import fill_ds_config, read_ds_config
from dsunlearn.engine.engine import offloads_optimizer
from dsunlearn.errors import ConfigError
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "deepspeed"


def _zero(name: str) -> dict:
    return read_ds_config(CONFIGS / f"{name}.json")["zero_optimization"]


def test_offload_configs_are_the_plain_ones_plus_offload():
    """zero3_offload = zero3_bf16 + offload_optimizer (pinned), zero3_offload_param adds
    offload_param; the CPU test variant is zero3_cpu + offload_optimizer, so its partitions
    (and a saliency mask made under zero3_cpu) are the same."""
    pinned = {"device": "cpu", "pin_memory": True}
    assert _zero("zero3_offload") == {**_zero("zero3_bf16"), "offload_optimizer": pinned}
    assert _zero("zero3_offload_param") == {**_zero("zero3_offload"), "offload_param": pinned}
    unpinned = {"device": "cpu", "pin_memory": False}
    assert _zero("zero3_cpu_offload") == {**_zero("zero3_cpu"), "offload_optimizer": unpinned}
    for name in ("zero3_offload", "zero3_offload_param", "zero3_cpu_offload"):
        ds = fill_ds_config(
            read_ds_config(CONFIGS / f"{name}.json"), global_batch=4, world_size=2, grad_clip=1.0
        )
        assert offloads_optimizer(ds), name
    for name in ("zero3_bf16", "zero3_cpu"):
        assert not offloads_optimizer(read_ds_config(CONFIGS / f"{name}.json")), name
    assert not offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "none"}}})


def _isolated_build(monkeypatch, tmp_path) -> None:
    """A CPU Adam load into an empty cache of its own, forgotten after the test: torch's JIT
    versioner remembers every (sources, flags, folder) it saw per process, and a second load
    from the real cache would then build `cpu_adam_v1` there (the next rank rebuilding it as
    `cpu_adam`: about 40 s each, twice in every suite run)."""
    from deepspeed.ops.op_builder.builder import OpBuilder
    from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delitem(OpBuilder._loaded_ops, "cpu_adam", raising=False)
    monkeypatch.setattr(JIT_EXTENSION_VERSIONER, "entries", {})


def test_unbuildable_cpu_adam_stops_with_one_line(monkeypatch, tmp_path):
    """No C++ compiler (and an empty extension cache): one line that names it."""
    from dsunlearn.engine.engine import _load_cpu_adam_op

    _isolated_build(monkeypatch, tmp_path)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ConfigError) as err:
        _load_cpu_adam_op()
    message = str(err.value)
    print(message)
    assert "\n" not in message
    assert "CPU Adam op, which could not be built: /nonexistent/g++ not found" in message


def test_a_lock_left_by_a_killed_build_stops_with_one_line(monkeypatch, tmp_path):
    """torch waits forever on the lock file of a build that was killed: name it instead."""
    import os

    from dsunlearn.engine.engine import _load_cpu_adam_op

    _isolated_build(monkeypatch, tmp_path)
    lock = tmp_path / "ext" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))  # the lock of a build killed long ago
    with pytest.raises(ConfigError, match=f"waits on {lock}, left by a build that was killed"):
        _load_cpu_adam_op()
