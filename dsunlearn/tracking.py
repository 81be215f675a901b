"""Experiment tracking from rank 0: TensorBoard, and Weights & Biases in offline mode.

    tracker = Tracker.open(cfg.report_to, run_dir, cfg.name, config_dict, info.is_main)
    tracker.log({"ga/train/forget_loss": 2.3, "ga/train/lr": 1e-4}, step=12)
    tracker.close()

Keys are `<method>/<split>/<name>`; `step` counts from 0 for each method. Only rank 0 writes:
every other rank (and an empty `report_to`) gets a tracker that does nothing and imports
nothing. The backends' names are checked on every rank alike, so a bad `report_to` stops all
ranks with the same one-line `ConfigError`.

- `tensorboard`: `torch.utils.tensorboard.SummaryWriter` event files in `<log_dir>/tensorboard/`.
- `wandb`: a W&B run in OFFLINE mode only, under `<log_dir>/wandb/offline-run-*/`; nothing is
  sent anywhere (upload later with `wandb sync <that folder>`). Each method's metrics are plotted
  against their own `<method>/step` (W&B's `define_metric`), because W&B's own step may never go
  back while each method's steps start again at 0.

A backend that cannot start stops the run at `open` with one line (before any work is done). After
that, tracking never stops the run: NaN and inf are logged as they are, a value that is not a
number is skipped with one warning, and a backend that fails while logging or closing is switched
off with one warning.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsunlearn.errors import ConfigError

log = logging.getLogger("dsunlearn.tracking")

# name -> (module that must be importable, what to install when it is not)
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'dsunlearn[tracking]' (or: pip install wandb)"),
}
WANDB_PROJECT = "dsunlearn"


def backend_names(report_to: Sequence[str] | str | None) -> list[str]:
    """The requested backends, lower-cased, in order, without repeats; unknown ones refused."""
    if report_to is None:
        return []
    if isinstance(report_to, str):
        report_to = [report_to]
    names: list[str] = []
    for raw in report_to:
        name = str(raw).strip().lower()
        if not name or name == "none":
            continue
        if name not in BACKENDS:
            raise ConfigError(
                f"report_to: unknown tracker '{raw}'; known: {', '.join(sorted(BACKENDS))}"
            )
        if name not in names:
            names.append(name)
    return names


def _require(name: str) -> None:
    """A missing package is a ConfigError; find_spec looks without importing it."""
    module, install = BACKENDS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"report_to={name} needs the '{module}' package: {install}")


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (paths, tuples and the like as strings)."""
    return json.loads(json.dumps(dict(config), default=str))


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, log_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = log_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))
        text = json.dumps(_jsonable(config), indent=2, sort_keys=True)
        self.writer.add_text("config", f"run `{run_name}`\n\n```\n{text}\n```", global_step=0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)  # NaN and inf are kept

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    """One offline W&B run. `reinit="create_new"` (wandb >= 0.19.10) makes every open a fresh,
    independent run, whatever other run this process has open or had before."""

    name = "wandb"

    def __init__(self, log_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        # Read when wandb starts its service process: without it, wandb-core resolves its
        # error-reporting host even offline. A user's own setting wins.
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        settings = wandb.Settings(
            silent=True,  # no banner, no sync hints on our console
            console="off",  # leave stdout/stderr alone (no capture into output.log)
            disable_git=True,
            save_code=False,
            reinit="create_new",
        )
        self.run = wandb.init(
            mode="offline",  # never online: clusters upload later with `wandb sync`
            dir=str(log_dir),
            project=WANDB_PROJECT,
            name=run_name,
            config=_jsonable(config),
            settings=settings,
        )
        self.dir = Path(self.run.dir).parent  # <log_dir>/wandb/offline-run-<time>-<id>
        self._prefixes: set[str] = set()  # methods whose `<method>/*` has its own step axis
        self._plain: set[str] = set()  # keys without a method, on the `step` axis

    def _axis(self, prefix: str, key: str) -> str:
        """The step metric of `key`: `<prefix>/step` for a method's keys, `step` otherwise."""
        if prefix:
            step_key = f"{prefix}/step"
            if prefix not in self._prefixes:
                self.run.define_metric(step_key, hidden=True)
                self.run.define_metric(f"{prefix}/*", step_metric=step_key)
                self._prefixes.add(prefix)
            return step_key
        if not self._plain:
            self.run.define_metric("step", hidden=True)
        if key not in self._plain:
            self.run.define_metric(key, step_metric="step")
            self._plain.add(key)
        return "step"

    def log(self, scalars: dict[str, float], step: int) -> None:
        rows: dict[str, dict[str, float]] = {}
        for key, value in scalars.items():
            prefix = key.split("/", 1)[0] if "/" in key else ""
            axis = self._axis(prefix, key)
            rows.setdefault(axis, {axis: step})[key] = value
        for row in rows.values():
            self.run.log(row)  # no step=: W&B's own step just counts rows

    def close(self) -> None:
        self.run.finish()


_FACTORIES = {"tensorboard": _TensorBoard, "wandb": _WandB}


class Tracker:
    """Scalars to TensorBoard and/or W&B (offline), from rank 0 only; see the module doc."""

    def __init__(self, backends: Sequence[Any] = ()) -> None:
        self._backends = list(backends)
        self._warned_keys: set[str] = set()

    @classmethod
    def open(
        cls,
        report_to: Sequence[str],
        log_dir: Path,
        run_name: str,
        config: dict[str, Any],
        is_main: bool,
    ) -> Tracker:
        names = backend_names(report_to)  # every rank: the same error everywhere
        for name in names:
            _require(name)
        if not is_main or not names:
            return cls()
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        backends: list[Any] = []
        for name in names:
            try:
                backends.append(_FACTORIES[name](log_dir, run_name, config or {}))
            except BaseException as e:
                for backend in backends:
                    _close_quietly(backend)
                if not isinstance(e, Exception):
                    raise
                # At the start, before any work: better one clear line than a run the user
                # believes tracked.
                raise ConfigError(
                    f"report_to={name}: could not start ({_one_line(e)}); "
                    f"fix it or drop {name} from report_to"
                ) from e
        for backend in backends:
            log.info("tracking: %s -> %s", backend.name, backend.dir)
        return cls(backends)

    @property
    def enabled(self) -> bool:
        return bool(self._backends)

    @property
    def backends(self) -> list[str]:
        return [b.name for b in self._backends]

    @property
    def dirs(self) -> dict[str, Path]:
        """Where each backend writes: `tensorboard` and the W&B run folder."""
        return {b.name: b.dir for b in self._backends}

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        if not self._backends or not scalars:
            return
        values: dict[str, float] = {}
        for key, value in scalars.items():
            try:
                values[str(key)] = float(value)  # tensors, numpy scalars; NaN/inf kept
            except (TypeError, ValueError):
                if key not in self._warned_keys:
                    self._warned_keys.add(key)
                    log.warning("tracking: '%s' is not a number (%r); not logged", key, value)
        if not values:
            return
        for backend in list(self._backends):
            try:
                backend.log(values, int(step))
            except Exception as e:  # never stop the run for tracking
                self._drop(backend, "log", e)

    def close(self) -> None:
        backends, self._backends = self._backends, []
        for backend in backends:
            try:
                backend.close()
            except Exception as e:
                log.warning("tracking: %s failed to close (%s)", backend.name, _one_line(e))

    def _drop(self, backend: Any, what: str, e: Exception) -> None:
        log.warning(
            "tracking: %s failed to %s (%s); it is off for the rest of the run",
            backend.name,
            what,
            _one_line(e),
        )
        self._backends.remove(backend)
        _close_quietly(backend)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(backend: Any) -> None:
    with contextlib.suppress(Exception):
        backend.close()


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


__all__ = ["BACKENDS", "Tracker", "backend_names"]
