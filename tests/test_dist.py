"""Process-group start-up on the CPU accelerator: no JIT build, so no shared lock to hang on."""

from __future__ import annotations

import subprocess
import sys

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
