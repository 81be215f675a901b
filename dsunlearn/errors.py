"""User-facing errors.

Every problem caused by the user's input (a path, a schema, a config key, a model name, a
diverging loss) is raised as a `DsunlearnError`. The CLI prints it as one line and exits with
its `exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DsunlearnError(Exception):
    """Base class: one clear line for the user, a non-zero exit for the shell."""

    exit_code = 2
    label = "error"  # the CLI prints `dsunlearn: <label>: <message>`

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always a single line


class ConfigError(DsunlearnError):
    """Unknown key, bad value or unreadable config file."""


class DataError(DsunlearnError):
    """Missing data folder, wrong parquet schema, unreachable hub dataset."""


class ModelError(DsunlearnError):
    """Unknown model name, unreadable checkpoint, unsupported architecture."""


class MethodError(DsunlearnError):
    """Unknown unlearning method or a method used without what it needs."""


class TrainingError(DsunlearnError):
    """Training diverged (NaN or infinite loss)."""

    exit_code = 3


class Preempted(DsunlearnError):
    """A preemption signal arrived (or `checkpoint.stop_at` was reached): the ranks saved one
    checkpoint together and stopped; `resume=auto` continues from it."""

    exit_code = 75  # EX_TEMPFAIL: try again (engine.preempt.PREEMPTED_EXIT)
    label = "stopped"
