"""Shared fixtures: a small built-in benchmark, a tiny random vanilla model, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DS_CONFIG = str(REPO / "configs" / "deepspeed" / "zero3_cpu.json")
DURATIONS = REPO / "tests" / "durations.json"


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs 2 workers), a worker's in-process torch gets its
    share of the cores: two workers each spinning all cores' OpenMP threads made an in-process
    training test 8x slower. (Subprocesses get OMP_NUM_THREADS from `cli_env`.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--store-durations",
        action="store_true",
        help=f"write each test file's measured seconds into {DURATIONS.relative_to(REPO)}",
    )


def pytest_collection_modifyitems(config, items) -> None:
    """`pytest -m gpu` is the single-GPU fallback: every test parametrised on the "cuda"
    device (the kernels compiled, not interpreted) joins the tests marked `gpu` by hand.

    Files run longest first (`make test` hands files to its two workers in this order, with
    `--no-loadscope-reorder`): a long file started last left one worker running it alone.
    A file not in tests/durations.json yet goes first, as it may be long."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "cuda" in callspec.params.values():
            item.add_marker(pytest.mark.gpu)
    seconds = file_seconds()
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], float("inf")))


def file_seconds() -> dict[str, float]:
    """Measured seconds per test file (setup, call and teardown of all its tests)."""
    return json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}


_measured: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    # Under xdist this runs in the controller with every worker's reports.
    path = report.nodeid.split("::")[0]
    _measured[path] = _measured.get(path, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    """With --store-durations, merge this run's per-file seconds into tests/durations.json
    (files that did not run keep their old figure)."""
    if not session.config.getoption("--store-durations") or not _measured:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # the controller writes
    merged = {**file_seconds(), **{k: round(v, 1) for k, v in _measured.items()}}
    ordered = dict(sorted(merged.items(), key=lambda kv: -kv[1]))
    DURATIONS.write_text(json.dumps(ordered, indent=1) + "\n")


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory) -> Path:
    """6 fictitious people (1 forgotten), in MLLMU-Bench layout."""
    from dsunlearn.data.builtin import build_benchmark

    return build_benchmark(tmp_path_factory.mktemp("bench") / "b6", seed=0, entities=6)


def save_random_tiny(name: str, out: Path) -> Path:
    """A freshly initialised built-in tiny model saved as an HF folder."""
    from dsunlearn.models import load_model_and_processor, save_model_and_processor

    model, processor = load_model_and_processor(name, seed=0)
    return save_model_and_processor(model, processor, out)


@pytest.fixture(scope="session")
def random_vanilla(tmp_path_factory) -> Path:
    """A random tiny-llava folder: stands in for a learned vanilla model where skill is moot."""
    return save_random_tiny("tiny-llava", tmp_path_factory.mktemp("m") / "vanilla")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def unlearn_args(out: Path, bench: Path, vanilla: Path, *extra: str, name: str | None = None):
    """`dsunlearn unlearn` arguments on the demo config, redirected to a test's benchmark,
    vanilla model, output folder and the CPU DeepSpeed config; `extra` overrides follow."""
    args = ["unlearn", "--config", str(REPO / "configs" / "demo.yaml")]
    args += [f"out_dir={out}", f"data.path={bench}", f"vanilla={vanilla}"]
    args += [f"deepspeed={DS_CONFIG}", *([f"name={name}"] if name else [])]
    return [*args, *extra]


def run_cli(args: list[str], cwd: Path, timeout: int = 600, **env: str):
    """`python -m dsunlearn ARGS` in a fresh process, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "dsunlearn", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main_error(capsys, args: list[str]) -> str:
    """`dsunlearn ARGS` in this process for a refusal made before any rank starts: exit 2 and
    exactly one line on stderr; returns that line. Saves a fresh interpreter (~6 s) per case;
    tests/test_cli.py and test_export.py keep fresh-process cases for the real exit path."""
    from dsunlearn.cli import main

    with capsys.disabled():  # loggers made by these imports bind the real streams, not a capture
        import dsunlearn.recipes.unlearn  # noqa: F401
    capsys.readouterr()  # what the test itself printed before
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsunlearn: error: "), err
    return lines[0]


def run_deepspeed(ranks: int, args: list[str], cwd: Path, timeout: int = 600, **env: str):
    """`deepspeed --num_gpus N --module dsunlearn ARGS`: real ranks through the real launcher."""
    from dsunlearn.recipes.demo import deepspeed_launch_cmd

    return subprocess.run(
        deepspeed_launch_cmd(ranks, args),
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def zero3_build_and_step(families: list[str]) -> dict[str, int]:
    """tests/ranks/zero3_build_step.py over `families` in one fresh process (world size 1 over
    gloo): every family passed its checks; family -> parameter count the script reported."""
    from dsunlearn.engine.dist import free_port

    env = cli_env(TEST_PORT=str(free_port()), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ranks" / "zero3_build_step.py"), *families],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # ends with "ZERO3_FAIL <family>"
    ok = [line.split() for line in proc.stdout.splitlines() if line.startswith("ZERO3_OK ")]
    return {name: int(total) for _, name, total in ok}


def rerun_under_interpreter(test_file: str, keyword: str) -> None:
    """Run `test_file -k keyword` in a fresh process with TRITON_INTERPRET=1 and require that
    every selected test passed. The interpreter must be on before triton is first imported, which
    other test modules of this process may already have done."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


def assert_gold_verdicts(report: dict, md: str) -> None:
    """The gold row and every other row's forget quality and gap (the gold model is the
    evaluated model here: p-value 1, every gap 0)."""
    (name,) = report["methods"]
    assert report["gold"] == report["methods"][name]
    for row in (name, "vanilla"):
        q = report["vs_gold"][row]["forget_quality"]
        assert q["p_value"] == pytest.approx(1.0) and q["n"] == q["n_gold"] > 0
        assert set(report["vs_gold"][row]["gap"].values()) == {0.0}
    assert "| gold |" in md and "## Against the gold model" in md
