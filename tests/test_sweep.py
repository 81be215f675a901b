"""`dsunlearn sweep` as a user runs it: real trials on 1 and 2 ranks, a killed worker, a restart.

One small setting throughout: GA on the 6-person benchmark for 8 iterations, validation every 2,
the random tiny model as vanilla and gold, lr drawn from a log range; 2 trials (the least that
has a front to choose from and, in the killed-worker test, a trial before the killed one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import DS_CONFIG, REPO, cli_env, run_cli, run_deepspeed

pytestmark = pytest.mark.slow

SPACE = """\
method: ga
params:
  optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
fixed: {optim.steps: 8, optim.batch_size: 4, eval.every: 2, eval.max_items: 24}
pruner: none
sampler: {type: tpe, seed: 0}
"""


def _overrides(bench: Path, vanilla: Path, out: Path) -> list[str]:
    return [
        f"out_dir={out}",
        f"data.path={bench}",
        f"vanilla={vanilla}",
        f"gold={vanilla}",
        f"deepspeed={DS_CONFIG}",
        "report_to=[]",
        "eval.val_max_items=12",
    ]


TRIALS = 2


def _sweep_args(tmp: Path, bench: Path, vanilla: Path, *extra: str) -> list[str]:
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    args = ["sweep", "--config", str(REPO / "configs" / "demo.yaml"), "--space", str(space)]
    return [
        *args,
        "--trials",
        str(TRIALS),
        "--out",
        str(tmp / "sw"),
        *extra,
        *_overrides(bench, vanilla, tmp),
    ]


def _direct_args(tmp: Path, bench: Path, vanilla: Path, params: dict) -> list[str]:
    """`dsunlearn unlearn` with the sweep's fixed settings and the chosen trial's values. It
    reads the reference scores the sweep cached (the key must match: else it scores them)."""
    fixed = ["optim.steps=8", "optim.batch_size=4", "eval.every=2", "eval.max_items=24"]
    chosen = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    return [
        "unlearn",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        *_overrides(bench, vanilla, tmp),
        *fixed,
        "methods=[ga]",
        "name=direct",
        f"eval.reference_cache={tmp / 'sw' / 'references'}",
        *chosen,
    ]


def _check_sweep_json(sw: Path) -> dict:
    s = json.loads((sw / "sweep.json").read_text())
    complete = [t for t in s["trials"] if t["state"] == "complete"]
    assert s["counts"]["complete"] == len(complete) == TRIALS
    assert [o["name"] for o in s["objectives"]] == ["forget_gap", "retain_kept"]
    for t in complete:
        assert 1e-5 <= t["params"]["optim.lr"] <= 1e-3
        assert len(t["values"]) == 2 and 0 <= t["values"][1] <= 1
        assert t["outcome"]["selected_step"] in (2, 4, 6, 8)
        assert set(t["curve"]) == {"2", "4", "6", "8"}  # the streamed validation curve
        assert not (sw / "trials" / t["run"] / "report.json").read_text().count('"benchmark"')
    numbers = {t["number"] for t in complete}
    assert set(s["front"]) <= numbers and s["chosen"]["number"] in s["front"]
    assert s["chosen"]["same_selection_as_trial"] is True
    assert s["chosen"]["test"] and "p_value" in s["chosen"]["forget_quality"]
    assert (sw / "sweep.png").stat().st_size > 10_000
    return s


def test_sweep_on_two_ranks_and_its_choice_equals_a_direct_run(
    tmp_path, small_bench, random_vanilla
):
    args = _sweep_args(tmp_path, small_bench, random_vanilla, "--ranks", "2")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = _check_sweep_json(tmp_path / "sw")
    assert "world size 2" in (tmp_path / "sw" / "trials" / "trial-0000.log").read_text()
    direct = run_deepspeed(
        2, _direct_args(tmp_path, small_bench, random_vanilla, s["chosen"]["params"]), cwd=tmp_path
    )
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert "reference scores from" in direct.stdout + direct.stderr  # the sweep's, same key
    report = json.loads((tmp_path / "direct" / "report.json").read_text())
    assert report["methods"]["ga"] == s["chosen"]["test"]
    assert report["selection"]["ga"]["step"] == s["chosen"]["selected_step"]


def _run_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            found.append(p)
    return found


def test_killed_worker_then_restart_on_one_rank(tmp_path, small_bench, random_vanilla):
    """SIGKILL the only worker while trial 1 runs: its run stops by itself (watchdog). The
    sweep started again marks trial 1 failed, runs it again in the same folder, and ends the
    study with 2 complete trials, the first one kept from before. (That the chosen setting's
    test run equals a direct run is the 2-rank test's check.)"""
    args = _sweep_args(tmp_path, small_bench, random_vanilla)
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "dsunlearn", *args],
            cwd=tmp_path,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    curve = tmp_path / "sw" / "trials" / "trial-0001" / "val_curve.jsonl"
    deadline = time.monotonic() + 300
    while not curve.exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "trial 1 never started its validation"
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    marker = str(tmp_path / "sw" / "trials")
    deadline = time.monotonic() + 30
    while _run_processes(marker):
        assert time.monotonic() < deadline, "the killed worker's run is still going"
        time.sleep(0.5)
    assert not (tmp_path / "sw" / "trials" / "trial-0001" / "report.json").exists()

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "this worker ran 1" in again.stderr
    s = _check_sweep_json(tmp_path / "sw")
    by_number = {t["number"]: t for t in s["trials"]}
    assert by_number[0]["state"] == "complete"  # kept from the first worker
    assert by_number[1]["state"] == "fail" and "gone" in by_number[1]["failed_because"]
    retry = next(t for t in s["trials"] if t["retry_of"] == 1)
    assert retry["state"] == "complete" and retry["run"] == "trial-0001"
    assert retry["params"] == by_number[1]["params"]
