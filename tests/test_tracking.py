"""Experiment tracking (dsunlearn/tracking.py): what the files hold, read back with each tool's
own reader; rank 0 only; one-line errors; and `step_scalars` on a real 1-rank ZeRO-3 engine."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from dsunlearn.errors import ConfigError
from dsunlearn.tracking import Tracker
from tests.conftest import REPO

RUN_CONFIG = {"methods": ["ga", "npo"], "optim": {"lr": 1e-4, "steps": 3}, "out_dir": Path("/x")}


def _curves() -> dict[tuple[str, int], float]:
    """(tag, step) -> value for two methods, train and validation, with a NaN and an inf."""
    out: dict[tuple[str, int], float] = {}
    for m, method in enumerate(["ga", "npo"]):
        for step in range(4):
            out[(f"{method}/train/forget_loss", step)] = 2.5 - 0.25 * step + m
            out[(f"{method}/train/lr", step)] = 1e-4 * (step + 1) / 4
            out[(f"{method}/train/grad_norm", step)] = 0.5 + step + 10 * m
        for step in (1, 3):
            out[(f"{method}/val/forget_vqa_acc", step)] = 0.75 - 0.125 * step - 0.0625 * m
    out[("ga/train/grad_norm", 2)] = float("nan")
    out[("npo/train/grad_norm", 1)] = float("inf")
    return out


def _log_curves(tracker: Tracker, curves: dict[tuple[str, int], float]) -> None:
    """As the recipe does: one method after the other, each from step 0; train every step,
    validation every other step."""
    for method in ("ga", "npo"):
        for step in range(4):
            for split in ("train", "val"):
                row = {
                    tag: v
                    for (tag, s), v in curves.items()
                    if s == step and tag.startswith(f"{method}/{split}/")
                }
                if row:
                    tracker.log(row, step)


def _same(a: float, b: float, rel: float = 0.0) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rel * abs(b)


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_event_files_hold_every_tag_step_and_value(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = _curves()
    tracker = Tracker.open(["tensorboard"], tmp_path, "run-tb", RUN_CONFIG, is_main=True)
    assert tracker.backends == ["tensorboard"]
    assert tracker.dirs == {"tensorboard": tmp_path / "tensorboard"}
    _log_curves(tracker, curves)
    tracker.close()
    tracker.close()  # twice is harmless
    tracker.log({"ga/train/forget_loss": 1.0}, 99)  # after close: ignored

    assert [p.name for p in tmp_path.iterdir()] == ["tensorboard"]  # no W&B folder
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = {tag for tag, _ in curves}
    assert set(acc.Tags()["scalars"]) == tags
    for tag in tags:
        want = sorted((s, v) for (t, s), v in curves.items() if t == tag)
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (_, g), (_, w) in zip(got, want, strict=True):
            assert _same(g, w, rel=1e-6), (tag, g, w)  # stored as float32
    assert math.isnan(acc.Scalars("ga/train/grad_norm")[2].value)
    assert acc.Scalars("npo/train/grad_norm")[1].value == math.inf
    assert "config/text_summary" in acc.Tags()["tensors"]  # the run's config, as text


# ---------------------------------------------------------------------------------------------
# Weights & Biases, offline


def _wandb_records(path: Path):
    """Every record of an offline run's `run-<id>.wandb` file, decoded with wandb's own protobuf
    schema (`wandb.proto.wandb_internal_pb2.Record`).

    wandb >= 0.30 no longer ships a Python reader of this file (its `sdk/internal/datastore.py`
    left with the legacy `wandb sync`), so this follows the format that reader implemented:
    a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's log format (its
    doc/log_format.md: 32 KiB blocks of chunks with a 7-byte header: crc32, length, type FULL,
    FIRST, MIDDLE or LAST; a block tail under 7 bytes is zero padding). Every chunk's checksum is
    verified (zlib crc32 seeded with the type byte, as wandb writes it), so a misparse fails
    here instead of passing silently."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):  # zero-filled rest of a block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert len(chunk) == length, "truncated chunk"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at {pos}"
        assert kind in (1, 2, 3, 4), kind
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _wandb_run(run_dir: Path) -> dict:
    """What the run's transaction log says: run record, config, metric axes, history rows."""
    (log_file,) = run_dir.glob("run-*.wandb")
    out: dict = {"run": None, "config": {}, "axes": {}, "history": []}
    for record in _wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "metric" and record.metric.step_metric:
            name = record.metric.glob_name or record.metric.name
            out["axes"][name] = record.metric.step_metric
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)  # NaN and Infinity are JSON here
            out["history"].append(row)
    return out


@pytest.fixture
def wandb_offline_env(tmp_path, monkeypatch):
    """W&B's own files (settings, cache, artifacts) in tmp_path, and a server it cannot reach,
    so that even a call that tried to go online would fail here rather than leave."""
    pytest.importorskip("wandb", reason="wandb is not installed: pip install -e '.[tracking]'")
    home = tmp_path / "wandb-home"
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing there
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_ERROR_REPORTING", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_wandb_offline_runs_hold_the_logged_history(wandb_offline_env, capfd):
    tmp_path = wandb_offline_env
    curves = _curves()
    # Two trackers open at once (a second open while another run is live), then a third after
    # both closed (a relaunch in the same process): three separate offline runs.
    first = Tracker.open(["wandb"], tmp_path / "a", "run-a", RUN_CONFIG, is_main=True)
    second = Tracker.open(["wandb"], tmp_path / "b", "run-b", {"seed": 2}, is_main=True)
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"  # wandb-core: no error-report host
    _log_curves(first, curves)
    second.log({"ga/train/forget_loss": 7.0}, 0)
    first.close()
    second.close()
    third = Tracker.open(["wandb", "tensorboard"], tmp_path / "c", "run-c", {}, is_main=True)
    third.log({"npo/val/forget_vqa_acc": 0.5, "epoch": 3.0}, 5)
    third.close()
    printed = capfd.readouterr()
    # wandb itself is silent; our own "tracking: BACKEND -> DIR" lines say where each run went
    lines = (printed.out + printed.err).splitlines()
    assert [ln for ln in lines if "wandb" in ln and " tracking: " not in ln] == [], printed

    runs = {}
    for name in ("a", "b", "c"):
        (run_dir,) = (tmp_path / name / "wandb").glob("offline-run-*")
        runs[name] = _wandb_run(run_dir)
        assert runs[name]["run"].project == "dsunlearn"
        assert runs[name]["run"].display_name == f"run-{name}"
    ids = {r["run"].run_id for r in runs.values()}
    assert len(ids) == 3

    a = runs["a"]
    assert a["config"]["methods"] == ["ga", "npo"]
    assert a["config"]["optim"] == {"lr": 1e-4, "steps": 3}
    assert a["config"]["out_dir"] == "/x"
    # Each method is plotted against its own step (W&B's own step only grows).
    assert a["axes"] == {"ga/*": "ga/step", "npo/*": "npo/step"}
    found: dict[tuple[str, int], float] = {}
    for row in a["history"]:
        (axis,) = [k for k in row if k.endswith("/step") or k == "step"]
        for key, value in row.items():
            if not key.startswith("_") and key != axis:
                assert key.split("/")[0] == axis.split("/")[0], (key, axis)
                assert (key, row[axis]) not in found, ("logged twice", key, row[axis])
                found[(key, row[axis])] = value
    assert set(found) == set(curves)
    for key, want in curves.items():
        assert _same(found[key], want), (key, found[key], want)  # exact: JSON round trip

    b_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs["b"]["history"]]
    assert b_rows == [{"ga/step": 0, "ga/train/forget_loss": 7.0}]
    c_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs["c"]["history"]]
    assert c_rows == [{"npo/step": 5, "npo/val/forget_vqa_acc": 0.5}, {"step": 5, "epoch": 3.0}]
    assert runs["c"]["axes"] == {"npo/*": "npo/step", "epoch": "step"}
    assert (tmp_path / "c" / "tensorboard").is_dir()


# ---------------------------------------------------------------------------------------------
# Ranks, names, failures


_NON_MAIN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dsunlearn.tracking import Tracker
    out, names = Path(sys.argv[1]), sys.argv[2].split(",")
    for report_to, is_main in ((names, False), ([], True)):
        t = Tracker.open(report_to, out, "r", {"a": 1}, is_main=is_main)
        assert not t.enabled
        t.log({"ga/train/forget_loss": 1.0}, 0)
        t.close()
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("wandb", "tensorboard")
                 or m.startswith("torch.utils.tensorboard")))
    """
)


def test_non_main_rank_and_empty_report_to_write_and_import_nothing(tmp_path):
    import importlib.util

    out = tmp_path / "run"
    names = ["tensorboard"] + (["wandb"] if importlib.util.find_spec("wandb") else [])
    proc = subprocess.run(
        [sys.executable, "-c", _NON_MAIN, str(out), ",".join(names)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"  # neither wandb nor tensorboard was imported
    assert not out.exists()


@pytest.mark.parametrize("is_main", [True, False])
def test_unknown_backend_is_one_line_config_error(tmp_path, is_main):
    with pytest.raises(ConfigError) as e:
        Tracker.open(["tensorboard", "mlflow"], tmp_path, "r", {}, is_main=is_main)
    msg = str(e.value)
    assert msg == "report_to: unknown tracker 'mlflow'; known: tensorboard, wandb"
    assert not any(tmp_path.iterdir())  # nothing opened before the check


def test_missing_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec -> None
    with pytest.raises(ConfigError, match=r"needs the 'wandb' package: pip install") as e:
        Tracker.open(["tensorboard", "WandB"], tmp_path, "r", {}, is_main=True)
    assert "dsunlearn[tracking]" in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_tracking_never_stops_the_run(tmp_path, caplog):
    """A value that is not a number is skipped; a backend that fails is dropped with one
    warning; the other backends go on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Broken:
        name, dir = "broken", tmp_path
        calls = 0

        def log(self, scalars, step):
            Broken.calls += 1
            raise OSError("disk full")

        def close(self):
            raise OSError("still full")

    tracker = Tracker.open(["tensorboard"], tmp_path, "r", {}, is_main=True)
    tracker._backends.insert(0, Broken())
    with caplog.at_level(logging.WARNING, logger="dsunlearn.tracking"):
        for step in range(3):
            tracker.log({"ga/train/forget_loss": float(step), "ga/train/note": "n/a"}, step)
        tracker.close()
    assert Broken.calls == 1  # dropped after its first failure
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "broken failed to log (OSError: disk full)" in warnings[0] + warnings[1]
    assert "'ga/train/note' is not a number" in warnings[0] + warnings[1]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("ga/train/forget_loss")] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
    ]
    assert acc.Tags()["scalars"] == ["ga/train/forget_loss"]


# ---------------------------------------------------------------------------------------------
# step_scalars on a real ZeRO-3 engine


_ENGINE_SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    from PIL import Image
    from dsunlearn.config import ModelConfig, OptimConfig
    from dsunlearn.engine.dist import all_reduce_sum, init_distributed
    from dsunlearn.engine.engine import build_train_engine, optimizer_step, step_scalars
    from dsunlearn.models import encode_for_loss, load_model_and_processor
    from dsunlearn.recipes.common import deepspeed_config

    info = init_distributed()  # 1 rank, gloo on CPU
    # Warm-up over 4 steps: after one step the lr (2/4 of the peak) differs from the configured
    # one, so the check reads the live value.
    optim = OptimConfig(lr=1e-3, warmup_steps=4, batch_size=2, grad_clip=1.0)
    ds = deepspeed_config("configs/deepspeed/zero3_cpu.json", optim, ModelConfig(), info)
    model, processor = load_model_and_processor("tiny-llava", ds_config=ds, seed=0)
    engine = build_train_engine(model, optim, ds)
    before = step_scalars(engine)
    batch = encode_for_loss(processor, ["Who is this person?"] * 2,
                            [Image.new("RGB", (32, 32)), None], ["Alder Quinby"] * 2)
    held = []

    def norm_of_reduced_grads(eng):  # what DeepSpeed will clip, computed independently
        buf = eng.optimizer.grad_partitions_flat_buffer
        held.append(float(all_reduce_sum(buf.double().pow(2).sum().reshape(1)).sqrt()))

    optimizer_step(engine, engine(**batch).loss, "step 0", norm_of_reduced_grads)
    after = step_scalars(engine)
    print("RESULT " + json.dumps({
        "before": before, "after": after, "held_norm": held[0],
        "optimizer_lr": engine.optimizer.param_groups[0]["lr"],
        "scheduler_lr": engine.lr_scheduler.get_last_lr()[0],
        "zero_stage": ds["zero_optimization"]["stage"], "clipping": ds["gradient_clipping"],
        "world_size": info.world_size,
    }))
    """
)


def test_step_scalars_on_a_one_rank_zero3_engine():
    """Subprocess: torch.distributed state must not leak into the other tests."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
    }
    env.pop("MASTER_PORT", None)  # init_distributed picks a free one
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    r = json.loads(line[len("RESULT ") :])
    assert (r["zero_stage"], r["clipping"], r["world_size"]) == (3, 1.0, 1)
    assert set(r["before"]) == {"lr"}  # no step yet: no gradient norm, and no None value
    assert r["before"]["lr"] == pytest.approx(1e-3 / 4)
    assert set(r["after"]) == {"lr", "grad_norm"}
    assert r["after"]["lr"] == r["optimizer_lr"] == r["scheduler_lr"] == pytest.approx(1e-3 / 2)
    norm = r["after"]["grad_norm"]
    assert math.isfinite(norm) and norm > 0
    assert norm == pytest.approx(r["held_norm"], rel=1e-5)  # the norm before clipping
