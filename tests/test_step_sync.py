"""The unlearning loop's one collective per iteration (`recipes.unlearn.sync_iteration`):
losses, finite-loss check and preemption signal in a single all-reduce."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dsunlearn.engine.preempt import PreemptionFlag
from dsunlearn.errors import TrainingError
from dsunlearn.recipes import unlearn


class FakeEngine:
    """Just what `train_iteration` calls: backward, step, and the tracked scalars."""

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.ones(3))
        self.opt = torch.optim.SGD([self.w], lr=0.1)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()

    def get_lr(self) -> list[float]:
        return [0.1]

    def get_global_grad_norm(self) -> float:
        return 1.0


class FakeMethod:
    name = "fake"

    def __init__(self, forget_scale: float = 1.0) -> None:
        self.forget_scale = forget_scale

    def forget_loss(self, engine, batch, ref):
        return self.forget_scale * (engine.w**2).sum()

    def retain_loss(self, engine, batch, ref):
        return engine.w.sum()

    def before_step(self, engine, phase="forget"):
        pass


@pytest.fixture
def two_ranks(monkeypatch):
    """A pretend 2-rank world: every all-reduce is recorded, and the other rank's tensor is
    `other["rank1"](this rank's)`: by default the same (two ranks that agree)."""
    calls: list[torch.Tensor] = []
    other = {"rank1": lambda t: t}

    def all_reduce(t, op=None):
        calls.append(t.clone())
        t.add_(other["rank1"](t.clone()))

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(unlearn, "encode_batch", lambda processor, examples, device: {})
    return calls, other


def _run(preempt: PreemptionFlag | None = None):
    info = SimpleNamespace(device=torch.device("cpu"), world_size=2, rank=0)
    return SimpleNamespace(info=info, processor=None, ref=None, preempt=preempt or PreemptionFlag())


def test_one_all_reduce_per_iteration_with_retain_steps(two_ranks):
    calls, _ = two_ranks
    engine = FakeEngine()
    row, scalars, signalled = unlearn.train_iteration(
        FakeMethod(), _run(), engine, 1, forget=[0], retains=[[0], [0], [0]]
    )
    assert len(calls) == 1  # forget + 3 retain steps + preemption flag: one collective
    assert not signalled
    assert row["forget_loss"] == pytest.approx(3.0)  # mean over the 2 (equal) ranks
    assert row["step"] == 1 and "retain_loss" in row and scalars["forget_lr"] == 0.1


def test_a_signal_on_the_other_rank_stops_both(two_ranks):
    _, other = two_ranks

    def signal_there(t: torch.Tensor) -> torch.Tensor:
        t[-2] = 1.0  # that rank's vote for SIGUSR1 (the packed tensor ends with the votes)
        return t

    other["rank1"] = signal_there
    preempt = PreemptionFlag()
    _, _, signalled = unlearn.train_iteration(FakeMethod(), _run(preempt), FakeEngine(), 1, [0], [])
    assert signalled and preempt.name == signal.SIGUSR1.name


def test_a_bad_loss_on_one_rank_stops_every_rank_with_one_line(two_ranks):
    calls, other = two_ranks

    def fine_there(t: torch.Tensor) -> torch.Tensor:
        t[1] = 0.0  # [loss, its bad flag, 2 votes]: the other rank's loss was finite
        return t

    other["rank1"] = fine_there
    with pytest.raises(TrainingError, match=r"fake forget step 7: loss is not finite .* 1 rank"):
        unlearn.train_iteration(FakeMethod(float("nan")), _run(), FakeEngine(), 7, [0], [])
    assert len(calls) == 1
