"""A sweep worker: takes trials of a shared Optuna study, runs each as a real unlearn run.

Any number of workers (processes, nodes, Slurm array tasks) share one study through its storage:
an Optuna journal file by default (appends under a lock file; safe on NFS/Lustre), or an RDB URL.
Each trial is a child run, `dsunlearn unlearn` on `ranks` ranks (the deepspeed launcher above
one rank), with in-run selection on the validation split and no test split (`eval.test=false`);
the reference scores are shared through `eval.reference_cache`.

While a trial runs, its worker:
- reads the run's `val_curve.jsonl` and keeps each validation's best score so far in the
  trial's `curve` attribute; the space's pruner (median/percentile) judges that curve against
  the complete trials' curves and may stop the run: the trial is PRUNED. (The curve is not
  stored as Optuna intermediate values: in a multi-objective study Optuna's pruners refuse them
  and its TPE sampler fails on pruned trials that have them. `ScoreView` shows the pruner the
  curves as intermediate values of a one-direction study.)
- writes a heartbeat (`heartbeat` user attribute) every `heartbeat_s`.

A worker that died (its pid gone on this host, or no heartbeat for `stale_after_s`) leaves a
RUNNING trial behind: the next worker that looks marks it FAIL and enqueues a retry with the same
settings, in the same run folder with `resume=auto` (it continues from the last complete
checkpoint if the config saves any). The dead worker's ranks stop by themselves
(engine/watchdog.py). A study is done when `trials` trials have finished (COMPLETE or PRUNED);
failed ones do not count. Workers that find the last trials running elsewhere wait for them: a
trial may still die and need a retry.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from dsunlearn.engine import watchdog
from dsunlearn.engine.preempt import PREEMPTED_EXIT, SIGNALS
from dsunlearn.errors import Preempted
from dsunlearn.sweep.outcome import SweepError, objective_values, trial_outcome
from dsunlearn.sweep.space import Space, as_overrides

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
BAD_INPUT_EXIT, DIVERGED_EXIT = 2, 3


def say(msg: str) -> None:
    print(f"sweep[{socket.gethostname()}:{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- storage, study


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """An RDB URL (`sqlite:///x.db`, `postgresql://...`) or a journal file path."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    path = Path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def build_sampler(spec: dict[str, Any], trial_number: int = 0) -> optuna.samplers.BaseSampler:
    """The space's sampler; a seed becomes seed + trial number, so that each trial's draw is
    reproducible whichever worker makes it, and two workers never draw the same values."""
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    if kwargs.get("seed") is not None:
        kwargs["seed"] = int(kwargs["seed"]) + trial_number
    cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    try:
        return cls[spec["type"]](**kwargs)
    except TypeError as e:
        raise SweepError(f"sampler {spec}: {e}") from None


def build_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner | None:
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    cls = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner}
    if spec["type"] == "none":
        return None
    try:
        return cls[spec["type"]](**kwargs)
    except (TypeError, ValueError) as e:
        raise SweepError(f"pruner {spec}: {e}") from None


def open_study(
    storage: optuna.storages.BaseStorage, name: str, space: Space, setup_key: str
) -> optuna.Study:
    """Create the study or join it; a worker with another space or config is refused."""
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=[o.direction for o in space.objectives],
        sampler=build_sampler(space.sampler),
        load_if_exists=True,
    )
    if "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup_key)
        with warnings.catch_warnings():  # experimental in Optuna, harmless here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.name for o in space.objectives])
    elif study.user_attrs["setup"] != setup_key:
        raise SweepError(
            f"study '{name}' was started with another space file or config: join it with the "
            "same ones, or pick another --study"
        )
    return study


class ScoreView:
    """What Optuna's pruners read of a study, with one direction: each trial's intermediate
    values are its `curve`, the in-run selection's best score so far (higher is better)."""

    direction = optuna.study.StudyDirection.MAXIMIZE

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    @staticmethod
    def with_curve(t: FrozenTrial) -> FrozenTrial:
        t = copy.deepcopy(t)
        t.intermediate_values = {int(k): float(v) for k, v in t.user_attrs.get("curve", {}).items()}
        return t

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=False, states=states)
        return [self.with_curve(t) for t in trials]


# ----------------------------------------------------------------------------- the worker


@dataclass
class TrialLaunch:
    """How a trial's run is started: the base command and where runs go."""

    config: str
    overrides: list[str]  # the user's, then the space's fixed keys
    space: Space
    base: dict[str, Any]  # the trials' config as a mapping (the space's `when` reads it)
    ranks: int
    sweep_dir: Path
    reference_cache: str  # shared by every trial (and sweep) of the same models and data

    @property
    def runs_dir(self) -> Path:
        return self.sweep_dir / "trials"

    def args(self, name: str, params: dict[str, Any], test: bool, resume: bool) -> list[str]:
        return [
            "unlearn",
            "--config",
            self.config,
            *self.overrides,
            f"methods=[{self.space.method}]",
            f"name={name}",
            f"eval.test={'true' if test else 'false'}",
            f"eval.reference_cache={self.reference_cache}",
            *as_overrides(params),
            *(["resume=auto"] if resume else []),
        ]

    def start(self, args: list[str], out_dir: Path, log: Path) -> subprocess.Popen:
        from dsunlearn.recipes.demo import deepspeed_launch_cmd, launch_env

        args = [*args, f"out_dir={out_dir}"]
        if self.ranks == 1:
            cmd = [sys.executable, "-m", "dsunlearn", *args]
        else:
            cmd = deepspeed_launch_cmd(self.ranks, args)
        env = launch_env(self.ranks)
        env[watchdog.ENV] = watchdog.identity()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            f.write(("$ " + " ".join(cmd) + "\n").encode())
            f.flush()
            # Own session: a prune kills the whole run. Preemption signals are ignored in
            # the launchers (the ranks install their own handlers): see launch/local.sh.
            return subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_ignore_preemption_signals,
            )


def _ignore_preemption_signals() -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def _kill(proc: subprocess.Popen) -> None:
    _signal_tree(proc, signal.SIGKILL)
    proc.wait()


@dataclass
class Worker:
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    launch: TrialLaunch
    trials: int
    pruner: optuna.pruners.BasePruner | None
    heartbeat_s: float = 10.0
    stale_after_s: float = 120.0
    max_retries: int = 2
    poll_s: float = 1.0
    signalled: int | None = None
    diverged: int = 0  # this worker's trials that diverged (they do not count as finished)
    ran: list[int] = field(default_factory=list)

    @property
    def study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.study.study_name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def counts(self) -> dict[str, int]:
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        return {s.name.lower(): states.count(s) for s in TrialState}

    # ------------------------------------------------------------------------- the loop

    def run(self) -> None:
        """Take trials until the study has `trials` finished ones."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            while True:
                self.reap_stale()
                c = self.counts()
                done = c["complete"] + c["pruned"]
                if done >= self.trials:
                    return
                if self.signalled is not None:
                    raise Preempted("signalled before the next trial: run the sweep again")
                if done + c["running"] >= self.trials and not c["waiting"]:
                    time.sleep(self.poll_s)  # the last trials run elsewhere; they may die
                    continue
                trial = self.study.ask()
                # Samplers read the history from storage: one per trial, seeded by its number.
                self.study.sampler = build_sampler(self.launch.space.sampler, trial.number)
                if self._surplus(trial.number):
                    trial.set_user_attr("failed_because", "surplus")
                    self.study.tell(trial, state=TrialState.FAIL)
                    continue
                self.run_trial(trial)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signum

    def _surplus(self, number: int) -> bool:
        """Workers that asked at the same moment may overshoot `trials`: the lowest numbers
        run, a later one is dropped (storage numbers trials atomically)."""
        busy = (*FINISHED, TrialState.RUNNING, TrialState.WAITING)
        trials = self.study.get_trials(deepcopy=False, states=busy)
        return sum(t.number < number for t in trials) >= self.trials

    # ------------------------------------------------------------------------- one trial

    def run_trial(self, trial: optuna.Trial) -> None:
        tid = self.trial_id(trial.number)
        attrs = trial.user_attrs
        run_name = attrs.get("run") or f"trial-{trial.number:04d}"
        retry = "retry_of" in attrs
        params = self.launch.space.draw(trial, self.launch.base)
        self.storage.set_trial_user_attr(tid, "run", run_name)
        me = {"host": socket.gethostname(), "id": watchdog.identity()}
        self.storage.set_trial_user_attr(tid, "worker", me)
        self.storage.set_trial_user_attr(tid, "heartbeat", time.time())
        run_dir = self.launch.runs_dir / run_name
        say(f"trial {trial.number}{' (retry)' if retry else ''}: {params}")
        args = self.launch.args(run_name, params, test=False, resume=retry)
        proc = self.launch.start(
            args, self.launch.runs_dir, self.launch.runs_dir / f"{run_name}.log"
        )
        try:
            pruned = self._follow(trial, tid, proc, run_dir)
        except BaseException:  # Ctrl-C, a storage error: the run must not outlive the worker
            _kill(proc)
            self.storage.set_trial_user_attr(tid, "failed_because", "its worker was interrupted")
            self.study.tell(trial, state=TrialState.FAIL)
            self._retry(self.study.get_trials(deepcopy=False)[trial.number])
            raise
        rc = proc.returncode
        self.ran.append(trial.number)
        if pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
            say(f"trial {trial.number}: pruned at step {pruned}")
            return
        if rc == 0:
            report = json.loads((run_dir / "report.json").read_text())
            try:
                outcome = trial_outcome(report, self.launch.space.method)
                values = objective_values(outcome, self.launch.space.objectives)
            except SweepError as e:  # every trial would fail the same way: stop the sweep
                self.storage.set_trial_user_attr(tid, "failed_because", str(e))
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            self.storage.set_trial_user_attr(tid, "outcome", outcome)
            self.study.tell(trial, values)
            names = [o.name for o in self.launch.space.objectives]
            say(f"trial {trial.number}: {dict(zip(names, values, strict=True))}")
            return
        tail = _last_line(self.launch.runs_dir / f"{run_name}.log")
        self.storage.set_trial_user_attr(tid, "failed_because", f"exit {rc}: {tail}")
        self.study.tell(trial, state=TrialState.FAIL)
        if rc == BAD_INPUT_EXIT:
            raise SweepError(f"trial {trial.number} stopped on bad input: {tail}")
        if rc == DIVERGED_EXIT:
            self.diverged += 1
            say(f"trial {trial.number}: diverged ({tail}); it does not count")
            if self.diverged > self.trials:
                raise SweepError(
                    f"{self.diverged} trials diverged (NaN or infinite loss): narrow the "
                    "space's learning-rate range"
                )
            return
        self._retry(self.study.get_trials(deepcopy=False)[trial.number])
        if rc == PREEMPTED_EXIT or self.signalled is not None:
            raise Preempted(
                f"trial {trial.number} stopped with a checkpoint after a signal; it is queued "
                "again: run the sweep again to continue"
            )

    def _follow(
        self, trial: optuna.Trial, tid: int, proc: subprocess.Popen, run_dir: Path
    ) -> int | None:
        """Wait for the run; report its validation curve; return the step it was pruned at."""
        curve_file = run_dir / "val_curve.jsonl"
        curve: dict[int, float] = {}
        last_beat = time.time()
        forwarded = False
        while proc.poll() is None:
            time.sleep(self.poll_s)
            if self.signalled is not None and not forwarded:
                say(f"got {signal.Signals(self.signalled).name}: the trial saves and stops")
                _signal_tree(proc, signal.SIGUSR1)
                forwarded = True
            if time.time() - last_beat >= self.heartbeat_s:
                self.storage.set_trial_user_attr(tid, "heartbeat", time.time())
                last_beat = time.time()
            for step, value in _new_points(curve_file, curve):
                curve[step] = value
                self.storage.set_trial_user_attr(
                    tid, "curve", {str(k): v for k, v in curve.items()}
                )
                if self.pruner is None or forwarded:
                    continue
                frozen = ScoreView.with_curve(self.storage.get_trial(tid))
                if self.pruner.prune(ScoreView(self.study), frozen):
                    _kill(proc)
                    return step
        return None

    # ------------------------------------------------------------------------- dead workers

    def reap_stale(self) -> None:
        """Mark the trials of dead workers FAIL and queue them again."""
        now = time.time()
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            w, beat = t.user_attrs.get("worker"), t.user_attrs.get("heartbeat")
            if beat is None:
                started = t.datetime_start.timestamp() if t.datetime_start else now
                dead = now - started > self.stale_after_s
            elif w and w.get("host") == host and w.get("id") != watchdog.identity():
                # Same host: the pid says it; wait out the orphaned ranks' watchdog poll.
                dead = not watchdog.is_alive(w["id"]) and now - beat > 3 * watchdog.POLL_S
            else:
                dead = now - beat > self.stale_after_s
            if not dead:
                continue
            tid = self.trial_id(t.number)
            why = f"worker {w} gone" if w else "worker gone before it started the run"
            try:  # (a finished trial takes no attributes: the reason goes first)
                self.storage.set_trial_user_attr(tid, "failed_because", why)
                self.storage.set_trial_state_values(tid, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another worker reaped it first
            say(f"trial {t.number}: {why}")
            self._retry(t)

    def _retry(self, t: FrozenTrial) -> None:
        retries = t.user_attrs.get("retries", 0)
        if retries >= self.max_retries:
            say(f"trial {t.number}: failed {retries + 1} times; not retried")
            return
        self.study.enqueue_trial(
            t.params,
            user_attrs={
                "retry_of": t.number,
                "retries": retries + 1,
                "run": t.user_attrs.get("run") or f"trial-{t.number:04d}",
            },
        )
        say(f"trial {t.number}: queued again")


def _new_points(curve: Path, seen: dict[int, float]) -> list[tuple[int, float]]:
    """Validation points not reported yet: (step, best score so far)."""
    if not curve.is_file():
        return []
    out = []
    for line in curve.read_text().splitlines():
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue  # being written
        step = int(point["step"])
        if step in seen or "best_score" not in point:
            continue
        seen[step] = float(point["best_score"])
        out.append((step, float(point["best_score"])))
    return out


def _last_line(log: Path) -> str:
    if not log.is_file():
        return "(no log)"
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    for x in reversed(lines):
        if x.startswith("dsunlearn: "):
            return x
    return lines[-1][-300:] if lines else "(empty log)"


def trial_record(t: FrozenTrial) -> dict[str, Any]:
    dur = t.duration.total_seconds() if t.duration else None
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "params": t.params,
        "values": t.values,
        "outcome": t.user_attrs.get("outcome"),
        "curve": t.user_attrs.get("curve", {}),  # best validation score so far, per step
        "run": t.user_attrs.get("run"),
        "retry_of": t.user_attrs.get("retry_of"),
        "failed_because": t.user_attrs.get("failed_because"),
        "duration_s": round(dur, 1) if dur is not None else None,
    }
