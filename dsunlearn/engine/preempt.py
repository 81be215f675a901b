"""Preemption: a signal on any rank becomes one coordinated checkpoint on all ranks.

Slurm warns a job before its time limit (`--signal=USR1@T`) and schedulers send SIGTERM before
they kill. A handler only records the signal; the training loop asks `requested()` at each step
boundary, which all-reduces the flag, so every rank sees the same answer at the same step, saves
the same checkpoint and exits with `PREEMPTED_EXIT` (75, EX_TEMPFAIL: "try again"), which a job
script tells apart from success (0), bad input (2) and a diverged loss (3).
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank was signalled (a collective: call on all ranks);
        afterwards `name` is the same signal on every rank."""
        t = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        got = int(t.item())
        if got and self.signum is None:
            self.signum = got  # another rank's signal
        return bool(got)  # not self.signum: a signal that came after the all-reduce waits

    def votes(self) -> list[float]:
        """This rank's signal as one count per signal in SIGNALS: summed over ranks inside a
        larger all-reduce, then read back with `agree` (no collective of its own)."""
        return [float(self.signum == sig) for sig in SIGNALS]

    def agree(self, votes: list[float]) -> bool:
        """`requested` from `votes` summed over every rank; the first signal any rank got is
        then the same `name` on every rank."""
        got = [sig for sig, n in zip(SIGNALS, votes, strict=True) if n > 0]
        if got and self.signum is None:
            self.signum = int(got[0])  # another rank's signal
        # From the votes only: a signal that arrived here after they were cast is counted at
        # the next collective, so every rank takes the same branch now.
        return bool(got)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"
