"""Checkpoint selection inside a run: which evaluated step of a method is its result.

Every `eval.every` iterations the run scores the validation split; a `Selector` reads those
metrics (never the test split's) and keeps the selected step. Rules (`select.criterion`):

- ``gold_first`` (default): the first step at which forget (validation) <= gold's +
  `select.forget_margin` and retain (validation) >= `select.retain_share` x vanilla's. Until a
  step qualifies, the selection is the best `score` so far.
- ``best_score``: the step with the best `score`.
- ``last``: the last evaluated step (what a run without selection reports).

`score = min(1, retain / vanilla_retain) - |forget - gold_forget|`: the share of the vanilla
model's retain accuracy kept, minus the distance from the gold model on forget; 1 is the best
possible (all retain utility kept, exactly gold's forget accuracy). Ties go to the earlier step.
Without a gold model, chance stands in for gold's forget accuracy (the report says so).

Early stopping (`early_stop.patience=K`): the run stops after K evaluations in a row that did
not change the selection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dsunlearn.config import SelectConfig
from dsunlearn.errors import ConfigError

CRITERIA = ("gold_first", "best_score", "last")


@dataclass(frozen=True)
class Targets:
    """What the criterion compares a step with: validation metrics of the reference models."""

    forget_key: str
    retain_key: str
    gold_forget: float  # the gold model's forget metric (or chance, see `gold_source`)
    vanilla_retain: float
    gold_source: str = "gold"  # "gold", or what stands in for it


def score(metrics: dict[str, float], t: Targets) -> float:
    """Retain utility kept minus the distance from gold on forget (higher is better, max 1)."""
    kept = 1.0 if t.vanilla_retain <= 0 else min(1.0, metrics[t.retain_key] / t.vanilla_retain)
    return kept - abs(metrics[t.forget_key] - t.gold_forget)


def check_criterion(cfg: SelectConfig, has_targets: bool) -> None:
    """A one-line ConfigError for an unknown rule, or a rule the benchmark cannot serve
    (`has_targets`: it has forget and retain validation metrics)."""
    if cfg.criterion not in CRITERIA:
        raise ConfigError(
            f"unknown select.criterion '{cfg.criterion}' (known: {', '.join(CRITERIA)})"
        )
    if cfg.criterion != "last" and not has_targets:
        raise ConfigError(
            f"select.criterion={cfg.criterion} needs a benchmark with forget and retain "
            "validation metrics; use select.criterion=last"
        )


@dataclass
class Selector:
    """Reads each evaluated step's validation metrics and keeps the selection (resumable:
    `state()` / `from_state`)."""

    cfg: SelectConfig
    targets: Targets | None
    patience: int = 0
    step: int | None = None  # the selected step
    metrics: dict[str, float] = field(default_factory=dict)  # its validation metrics
    qualified: bool = False  # it met gold_first's targets
    best: float = float("-inf")  # its score
    unchanged: int = 0  # evaluations since the selection last changed

    def __post_init__(self) -> None:
        check_criterion(self.cfg, self.targets is not None)

    def meets_targets(self, metrics: dict[str, float]) -> bool:
        t = self.targets
        assert t is not None
        return (
            metrics[t.forget_key] <= t.gold_forget + self.cfg.forget_margin
            and metrics[t.retain_key] >= self.cfg.retain_share * t.vanilla_retain
        )

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Take one evaluated step; True when it becomes the selection."""
        take = self._takes(metrics)
        if take:
            self.step, self.metrics = step, dict(metrics)
            if self.targets is not None:
                self.best = score(metrics, self.targets)
                self.qualified = self.cfg.criterion == "gold_first" and self.meets_targets(metrics)
            self.unchanged = 0
        else:
            self.unchanged += 1
        return take

    def _takes(self, metrics: dict[str, float]) -> bool:
        if self.cfg.criterion == "last" or self.step is None:
            return True
        if self.cfg.criterion == "gold_first":
            if self.qualified:
                return False
            if self.meets_targets(metrics):
                return True
        assert self.targets is not None
        return score(metrics, self.targets) > self.best

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.unchanged >= self.patience

    def reason(self) -> str:
        """Why the selected step was chosen, in words, for the report."""
        if self.step is None:
            return "no step was evaluated"
        if self.cfg.criterion == "last" or self.targets is None:
            return "the last evaluated step"
        t, m = self.targets, self.metrics
        gold = f"{t.gold_source} {t.gold_forget:.3f}"
        if self.qualified:
            return (
                f"first step with {t.forget_key} {m[t.forget_key]:.3f} <= {gold} + "
                f"{self.cfg.forget_margin} and {t.retain_key} {m[t.retain_key]:.3f} >= "
                f"{self.cfg.retain_share} x vanilla {t.vanilla_retain:.3f}"
            )
        prefix = "no step met the targets; " if self.cfg.criterion == "gold_first" else ""
        return (
            f"{prefix}best score {self.best:.3f} = retain kept "
            f"{min(1.0, m[t.retain_key] / t.vanilla_retain) if t.vanilla_retain > 0 else 1.0:.3f}"
            f" - |{t.forget_key} {m[t.forget_key]:.3f} - {gold}|"
        )

    def summary(self) -> dict[str, Any]:
        """The report's record of the selection."""
        out: dict[str, Any] = {
            "criterion": self.cfg.criterion,
            "step": self.step,
            "reason": self.reason(),
            "val": self.metrics,
        }
        if self.targets is not None:
            out["targets"] = asdict(self.targets)
            out["score"] = self.best
            if self.cfg.criterion == "gold_first":
                out["met_targets"] = self.qualified
        return out

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "metrics": self.metrics,
            "qualified": self.qualified,
            "best": self.best,
            "unchanged": self.unchanged,
        }

    @classmethod
    def from_state(
        cls, cfg: SelectConfig, targets: Targets | None, patience: int, state: dict[str, Any]
    ) -> Selector:
        return cls(cfg, targets, patience, **state)
