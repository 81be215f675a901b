"""Bad input: one clear line on stderr naming the problem, a non-zero exit, nothing clobbered."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from tests.conftest import main_error, run_cli, unlearn_args


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsunlearn: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_data_build_and_help(tmp_path):
    proc = run_cli(["data", "build", "--out", str(tmp_path / "d"), "--entities", "4"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "forget_10" / "train-00000-of-00001.parquet").is_file()
    assert run_cli(["--help"], tmp_path).returncode == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["methods=[ga,forgetall]"], "unknown method 'forgetall'"),
        (["methods=[ga,rmu]", "peft.lora.r=4"], "rmu changes the model's own weights, not LoRA"),
        (["methods=[manu]", "peft.lora.r=4"], "manu changes the model's own weights, not LoRA"),
    ],
)
def test_unlearn_config_errors(capsys, tmp_path, small_bench, random_vanilla, extra, message):
    line = main_error(capsys, unlearn_args(tmp_path, small_bench, random_vanilla, *extra))
    assert message in line


def test_unlearn_config_key_error_in_a_fresh_process(tmp_path, small_bench, random_vanilla):
    """A config refusal through `python -m dsunlearn`: exit 2 and nothing on stderr but the
    one line."""
    args = unlearn_args(tmp_path, small_bench, random_vanilla, "optim.lrr=1")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [_error_line(proc)]
    assert "unknown config key 'optim.lrr'" in _error_line(proc)


def test_batch_size_error_once_the_ranks_started(tmp_path, small_bench, random_vanilla):
    args = unlearn_args(tmp_path, small_bench, random_vanilla, "optim.batch_size=0")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2
    assert "batch size must be at least 1" in _error_line(proc)


def test_missing_config_file(capsys, tmp_path):
    line = main_error(capsys, ["unlearn", "--config", str(tmp_path / "nope.yaml")])
    assert "config file not found" in line


def test_missing_data_path(tmp_path, random_vanilla):
    proc = run_cli(["eval", "--model", str(random_vanilla), "--data", "/no/such/dir"], tmp_path)
    assert proc.returncode == 2
    assert "data path not found: /no/such/dir" in _error_line(proc)


def test_wrong_parquet_schema(tmp_path, small_bench, random_vanilla):
    bad = tmp_path / "bad"
    shutil.copytree(small_bench, bad)
    f = next((bad / "forget_10").glob("*.parquet"))
    pq.write_table(pq.read_table(f).drop_columns(["metadata"]), f)
    proc = run_cli(unlearn_args(tmp_path, bad, random_vanilla), tmp_path)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "forget_10" in line and "'metadata'" in line


def test_unknown_model(tmp_path, small_bench):
    proc = run_cli(
        ["learn", f"data.path={small_bench}", "model.name=not-a-model", f"cache_dir={tmp_path}"],
        tmp_path,
        HF_HUB_OFFLINE="1",
    )
    assert proc.returncode == 2
    assert "not-a-model" in _error_line(proc)


def test_missing_vanilla(tmp_path, small_bench):
    proc = run_cli(
        unlearn_args(tmp_path, small_bench, "null"), tmp_path, DSUNLEARN_CACHE=str(tmp_path)
    )
    assert proc.returncode == 2
    assert "no learned vanilla model" in _error_line(proc)


def test_nan_loss_stops_and_keeps_previous_report(tmp_path, small_bench, random_vanilla):
    run_dir = tmp_path / "nan"
    run_dir.mkdir()
    old = {"vanilla": {}, "methods": {}, "chance": 0.25, "world_size": 1, "elapsed_s": 1.0}
    (run_dir / "report.json").write_text(json.dumps(old))
    proc = run_cli(
        unlearn_args(
            tmp_path,
            small_bench,
            random_vanilla,
            "name=nan",
            "methods=[ga]",
            "optim.lr=1e30",
            "optim.steps=4",
            "eval.enabled=false",
        ),
        tmp_path,
    )
    assert proc.returncode == 3
    assert "loss is not finite" in _error_line(proc)
    assert json.loads((run_dir / "report.json").read_text()) == old
    # nothing else but the demo config's TensorBoard log of the steps before the NaN
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.json", "tensorboard"]
