"""Process-group start-up on the CPU accelerator: no JIT build, so no shared lock to hang on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

# In a child process: plant the lock a killed DeepSpeed build leaves behind, then start.
_START = """
import os, pathlib
from torch.utils.cpp_extension import _get_build_directory
build = pathlib.Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
(build / "lock").touch()
from dsunlearn.engine.dist import init_distributed
info = init_distributed()
assert (info.world_size, info.backend) == (1, "gloo"), info
print("started")
"""


def test_start_ignores_a_stale_torch_extensions_lock(tmp_path):
    """DeepSpeed's shm op waits forever on a lock left in torch_extensions: we never build it."""
    ext = tmp_path / "torch_extensions"
    proc = subprocess.run(
        [sys.executable, "-c", _START],
        cwd=REPO,
        env=cli_env(TORCH_EXTENSIONS_DIR=str(ext)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr[-3000:]
    built = [p.name for p in ext.rglob("*") if p.suffix in {".so", ".o"}]
    assert built == [], built


# In a child process: a command that joined the process group ends in each of three ways.
_LEAVE = """
import sys
import torch.distributed as dist
from dsunlearn import cli
from dsunlearn.engine.dist import init_distributed
from dsunlearn.errors import ConfigError, Preempted

def ending(exc):
    def run(args):
        init_distributed()
        if exc is not None:
            raise exc
    return run

for name, exc in (("done", None), ("preempted", Preempted("saved")), ("failed", ConfigError("x"))):
    cli.run = ending(exc)
    code = 0
    try:
        cli.main(["unlearn", "--config", "configs/demo.yaml"])
    except SystemExit as e:
        code = e.code
    print(name, code, dist.is_initialized())
    if dist.is_initialized():
        dist.destroy_process_group()
"""


def test_a_finished_or_preempted_command_leaves_the_process_group(tmp_path):
    """Gloo threads left at interpreter exit abort a finished rank (SIGABRT): leave the group
    when every rank is at the same point, and never wait on others after a failure alone."""
    proc = subprocess.run(
        [sys.executable, "-c", _LEAVE],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert [ln for ln in lines if ln.split(" ")[0] in {"done", "preempted", "failed"}] == [
        "done 0 False",
        "preempted 75 False",
        "failed 2 True",
    ], proc.stdout + proc.stderr[-2000:]


# In a child process: the `dsunlearn` entry point runs a command that ends in one of three ways.
_ENTRY = """
import atexit, os
from dsunlearn import cli
from dsunlearn.errors import ConfigError

atexit.register(lambda: print("finalised"))

def run(args):
    if os.environ["ENDING"] != "no-group":
        from dsunlearn.engine.dist import init_distributed
        init_distributed()
    print("work saved")  # not flushed: the exit must flush it
    if os.environ["ENDING"] == "failed":
        raise ConfigError("x")

cli.run = run
import sys
sys.argv = ["dsunlearn", "unlearn", "--config", "configs/demo.yaml"]
cli.entry()
"""


@pytest.mark.parametrize(
    "ending, code, finalised",
    [("done", 0, False), ("failed", 2, False), ("no-group", 0, True)],
)
def test_a_rank_exits_with_its_code_and_without_finalisation(ending, code, finalised):
    """A process that joined a group skips Python's finalisation (where gloo threads can abort
    a finished rank) yet keeps its exit code and its buffered output; others exit normally."""
    proc = subprocess.run(
        [sys.executable, "-c", _ENTRY],
        cwd=REPO,
        env=cli_env(ENDING=ending, PYTHONUNBUFFERED=""),  # block-buffered, as under a launcher
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "work saved" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert ("finalised" in proc.stdout) == finalised, proc.stdout
    if ending == "failed":
        assert "dsunlearn: " in proc.stderr and proc.stderr.rstrip().endswith("x"), proc.stderr


def test_logger_writes_to_the_stdout_of_the_moment(capsys):
    """A logger first made while stdout was swapped (an in-process CLI call under a capture)
    still logs once that stream is closed and stdout is back."""
    import contextlib
    import io

    from dsunlearn.engine.dist import get_logger

    swapped = io.StringIO()
    with contextlib.redirect_stdout(swapped):
        log = get_logger("dsunlearn.test_stdout")
        log.info("while swapped")
    swapped_text = swapped.getvalue()
    swapped.close()
    log.info("after")
    out, err = capsys.readouterr()
    assert "while swapped" in swapped_text
    assert "after" in out and "Logging error" not in err, err
