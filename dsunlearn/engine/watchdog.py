"""A run that dies with the process that started it.

A sweep worker starts each trial as a child run (through the deepspeed launcher for several
ranks). If the worker is killed outright (SIGKILL, a node's OOM killer, `scancel` of an array
task), nothing tells its trial's ranks: they are the launcher's children, not the worker's, and
would keep training into a folder that the trial's retry is about to resume. So the worker names
itself in `DSUNLEARN_WATCH_PID` (`pid:start_time`), and each rank polls it from a daemon thread
and exits at once when it is gone: the retry resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import psutil

ENV = "DSUNLEARN_WATCH_PID"
POLL_S = 2.0
ORPHANED_EXIT = 143  # as if terminated: the run did not finish


def identity(pid: int | None = None) -> str:
    """`pid:start_time` of a process (this one by default); a reused pid does not match."""
    proc = psutil.Process(pid or os.getpid())
    return f"{proc.pid}:{proc.create_time():.3f}"


def is_alive(ident: str) -> bool:
    pid, _, started = ident.partition(":")
    try:
        proc = psutil.Process(int(pid))
        return f"{proc.create_time():.3f}" == started and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False


def watch_parent_from_env() -> None:
    """Start the watch if `DSUNLEARN_WATCH_PID` is set (no-op otherwise)."""
    ident = os.environ.get(ENV)
    if not ident:
        return

    def watch() -> None:
        while is_alive(ident):
            time.sleep(POLL_S)
        print(
            f"dsunlearn: stopped: the process that started this run ({ident}) is gone",
            file=sys.stderr,
            flush=True,
        )
        os._exit(ORPHANED_EXIT)

    threading.Thread(target=watch, name="dsunlearn-watchdog", daemon=True).start()
