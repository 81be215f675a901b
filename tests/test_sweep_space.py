"""The sweep's parts that need no run: space files, the front and the choice, dead workers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import optuna
import pytest

from dsunlearn.config import UnlearnConfig, to_dict
from dsunlearn.errors import ConfigError
from dsunlearn.methods import METHODS
from dsunlearn.sweep.outcome import choose, objective_values, pareto_front, trial_outcome
from dsunlearn.sweep.space import load_space
from dsunlearn.sweep.worker import TrialLaunch, Worker, build_pruner, build_sampler, open_study
from tests.conftest import REPO, main_error

BASE = to_dict(UnlearnConfig())


def _space(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shipped_spaces_load(name):
    demo = to_dict(UnlearnConfig())
    space = load_space(REPO / "configs" / "sweeps" / f"{name}.yaml", demo)
    assert space.method == name
    assert [o.name for o in space.objectives] == ["forget_gap", "retain_kept"]
    keys = {p.key for p in space.params}
    if not METHODS[name].trains:  # nothing trains: no learning rate, no LoRA
        assert not any(k.startswith(("optim.", "peft.")) for k in keys) and keys
        return
    lr = "method.siu_lr" if name == "siu" else "method.mmu_lr" if name == "mmunlearner" else None
    assert (lr or "optim.lr") in keys and "peft.lora.r" in keys


@pytest.mark.parametrize(
    "text, message",
    [
        ("method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\nbogus: 1\n", "bogus: unknown key"),
        ("method: ga\nparams: {optim.lrr: {type: float, low: 1, high: 2}}\n", "unknown config key 'optim.lrr'"),
        ("method: ga\nparams: {optim.lr: {type: float, low: 1e-3, high: 1e-4}}\n", "empty range: low 0.001 must be below high 0.0001"),
        ("method: ga\nparams: {optim.lr: {type: float, low: 1.0, high: 1.0}}\n", "empty range"),
        ("method: ga\nparams: {optim.lr: {type: gaussian, low: 1, high: 2}}\n", "unknown distribution type 'gaussian'"),
        ("method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2, mean: 3}}\n", "unknown field 'mean'"),
        ("method: ga\nparams: {optim.lr: {type: float, low: 0, high: 1, log: true}}\n", "log distribution needs low > 0"),
        ("method: ga\nparams: {method.mmu_mask.modules: {type: categorical, choices: []}}\n", "non-empty list of choices"),
        ("method: ga\nparams: {optim.epochs: {type: int, low: 1.5, high: 3}}\n", "low must be a finite integer"),
        ("method: ga\nparams: {name: {type: categorical, choices: [a]}}\n", "the sweep sets this key itself"),
        ("method: forgetall\nparams: {optim.lr: {type: float, low: 1, high: 2}}\n", "unknown method 'forgetall'"),
        ("method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\nobjectives: [speed]\n", "unknown objective 'speed'"),
        ("method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\npruner: hyperband\n", "unknown type 'hyperband'"),
        ("method: ga\nparams: {}\n", "needs at least one parameter"),
        ("method: ga\nparams: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_space_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_space(_space(tmp_path, text), BASE)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "space.yaml") in str(e.value) or "space file" in str(e.value)


def test_space_error_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    """`dsunlearn sweep` in this process: the space is read before any trial starts."""
    space = _space(tmp_path, "method: ga\nparams: {optim.lr: {type: float, low: 2, high: 1}}\n")
    args = ["sweep", "--config", str(REPO / "configs" / "demo.yaml"), "--space", str(space)]
    line = main_error(capsys, [*args, "--trials", "3", f"out_dir={tmp_path}"])
    assert "empty range: low 2 must be below high 1" in line
    assert not (tmp_path / "sweeps").exists()  # nothing started


def test_when_draws_a_parameter_only_where_it_applies(tmp_path):
    text = (
        "method: mmunlearner\nparams:\n"
        "  method.mmu_mask.mode: {type: categorical, choices: [ratio, topk]}\n"
        "  method.mmu_mask.tau: {type: float, low: 0.5, high: 4, when: {method.mmu_mask.mode: ratio}}\n"
        "  method.mmu_mask.topk_pct: {type: float, low: 5, high: 60, when: {method.mmu_mask.mode: topk}}\n"
        "  peft.lora.r: {type: categorical, choices: [4, 8], when: {peft.lora.r: {not: 0}}}\n"
    )  # fmt: skip
    space = load_space(_space(tmp_path, text), BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        drawn = space.draw(study.ask(), BASE)
        mode = drawn["method.mmu_mask.mode"]
        other = "method.mmu_mask.topk_pct" if mode == "ratio" else "method.mmu_mask.tau"
        assert other not in drawn and "peft.lora.r" not in drawn  # LoRA is off in BASE
        seen.add(mode)
    assert seen == {"ratio", "topk"}
    lora_on = {**BASE, "peft": {"lora": {**BASE["peft"]["lora"], "r": 8}}}
    assert space.draw(study.ask(), lora_on)["peft.lora.r"] in (4, 8)


def _trial(number: int, forget: float, retain: float) -> dict:
    report = {
        "selection": {
            "ga": {
                "step": 4,
                "steps_run": 8,
                "val": {"forget_vqa_acc": forget, "retain_vqa_acc": retain},
                "targets": {
                    "forget_key": "forget_vqa_acc",
                    "retain_key": "retain_vqa_acc",
                    "gold_forget": 0.2,
                    "vanilla_retain": 0.8,
                },
            }
        }
    }
    o = trial_outcome(report, "ga")
    return {"number": number, "outcome": o, "values": [o["forget_gap"], o["retain_kept"]]}


def test_outcome_front_and_choice(tmp_path):
    space = load_space(
        _space(tmp_path, "method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\n"), BASE
    )
    t0 = _trial(0, forget=0.2, retain=0.6)  # at gold, keeps 75%
    t1 = _trial(1, forget=0.5, retain=0.8)  # far from gold, keeps all
    t2 = _trial(2, forget=0.3, retain=0.78)  # gap 0.1, keeps 97.5%
    t3 = _trial(3, forget=0.5, retain=0.7)  # dominated by t1
    assert t2["outcome"]["forget_gap"] == pytest.approx(0.1)
    assert t2["outcome"]["retain_kept"] == pytest.approx(0.975)
    trials = [t0, t1, t2, t3]
    front = pareto_front(trials, space.objectives)
    assert front == [0, 1, 2]
    assert choose(trials, front, "gold_first")[0] == 2  # closest to gold among >= 95% kept
    assert choose(trials, front, "best_score")[0] == 2  # 0.875 vs 0.75 and 0.7
    only_low = [t0, t3]
    assert "no trial on the front keeps" in choose(only_low, [0], "gold_first")[1]
    assert objective_values(t2["outcome"], space.objectives) == t2["values"]


def test_a_dead_workers_trial_is_failed_and_queued_again(tmp_path):
    space = load_space(
        _space(tmp_path, "method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\n"), BASE
    )
    storage = optuna.storages.InMemoryStorage()
    study = open_study(storage, "s", space, "key")
    launch = TrialLaunch("c.yaml", [], space, BASE, 1, tmp_path, str(tmp_path / "refs"))
    worker = Worker(study, storage, launch, trials=2, pruner=None)
    trial = study.ask()
    study.sampler = build_sampler(space.sampler, trial.number)
    space.draw(trial, BASE)
    tid = worker.trial_id(trial.number)
    storage.set_trial_user_attr(tid, "run", "trial-0000")
    storage.set_trial_user_attr(tid, "worker", {"host": socket.gethostname(), "id": "999999:1.000"})
    storage.set_trial_user_attr(tid, "heartbeat", time.time())
    worker.reap_stale()  # the pid is gone, but the orphaned ranks get a few seconds
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING
    storage.set_trial_user_attr(tid, "heartbeat", time.time() - 60)
    worker.reap_stale()
    first, retry = study.trials
    assert first.state == optuna.trial.TrialState.FAIL
    assert "gone" in first.user_attrs["failed_because"]
    assert retry.state == optuna.trial.TrialState.WAITING
    assert retry.user_attrs == {"retry_of": 0, "retries": 1, "run": "trial-0000"}
    worker.reap_stale()  # nothing more to do
    assert len(study.trials) == 2
    again = study.ask()  # the next worker takes the queued retry, with the same settings
    assert again.number == 1 and space.draw(again, BASE) == first.params


FAKE_RUN = """
import json, sys, time
curve = sys.argv[1]
for step, best in ((2, 0.1), (4, 0.1), (6, 0.1), (8, 0.1)):
    with open(curve, "a") as f:
        f.write(json.dumps({"method": "ga", "step": step, "val": {}, "best_score": best}) + "\\n")
    time.sleep(0.5)
time.sleep(60)  # a hopeless run that would go on: the pruner must stop it
"""


def test_the_pruner_stops_a_hopeless_trial_from_its_validation_curve(tmp_path):
    """Two finished trials scored 0.9 at every step; a run that streams 0.1 is pruned at the
    first step past the warm-up and its process is killed."""
    import subprocess
    import sys

    text = (
        "method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\n"
        "pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 3}\n"
    )
    space = load_space(_space(tmp_path, text), BASE)
    storage = optuna.storages.InMemoryStorage()
    study = open_study(storage, "s", space, "key")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1, 2)}
    for lr in (1.2, 1.4):
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": lr},
                distributions=dist,
                values=[0.1, 0.9],
                user_attrs={"curve": {"2": 0.9, "4": 0.9, "6": 0.9, "8": 0.9}},
            )
        )
    launch = TrialLaunch("c.yaml", [], space, BASE, 1, tmp_path, str(tmp_path / "refs"))
    procs = []

    def fake_start(args, out_dir, log):
        (out_dir / "trial-0002").mkdir(parents=True)
        curve = out_dir / "trial-0002" / "val_curve.jsonl"
        procs.append(subprocess.Popen([sys.executable, "-c", FAKE_RUN, str(curve)]))
        return procs[-1]

    launch.start = fake_start
    worker = Worker(study, storage, launch, trials=3, pruner=build_pruner(space.pruner))
    worker.poll_s = 0.2
    t0 = time.time()
    worker.run_trial(study.ask())
    assert time.time() - t0 < 30
    t = study.trials[2]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert t.user_attrs["curve"] == {"2": 0.1, "4": 0.1}  # warm-up 3: not at step 2, at step 4
    assert procs[0].poll() is not None  # killed
    # Optuna's TPE sampler, past its random start-up, draws the next trial of this
    # multi-objective study although one trial was pruned (it fails on pruned trials that hold
    # Optuna intermediate values: the curve lives in a user attribute instead).
    study.sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=1)
    assert 1 <= space.draw(study.ask(), BASE)["optim.lr"] <= 2


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_a_study_through_its_storage(tmp_path, kind):
    """Two workers, each with its own storage object on the same file (as two processes or
    nodes have): both see every trial, and when they ask at once beyond the budget the later
    trial number is the surplus one. A worker with another space file is refused."""
    from dsunlearn.sweep.outcome import SweepError
    from dsunlearn.sweep.worker import open_storage

    spec = str(tmp_path / "journal.log") if kind == "journal" else f"sqlite:///{tmp_path}/s.db"
    space = load_space(
        _space(tmp_path, "method: ga\nparams: {optim.lr: {type: float, low: 1, high: 2}}\n"), BASE
    )
    launch = TrialLaunch("c.yaml", [], space, BASE, 1, tmp_path, str(tmp_path / "refs"))
    workers = []
    for _ in range(2):
        storage = open_storage(spec)
        study = open_study(storage, "shared", space, "key")
        workers.append(Worker(study, storage, launch, trials=1, pruner=None))
    a, b = workers
    ta, tb = a.study.ask(), b.study.ask()
    assert (ta.number, tb.number) == (0, 1)
    assert {t.number for t in b.study.get_trials()} == {0, 1}
    assert not a._surplus(ta.number) and b._surplus(tb.number)
    with pytest.raises(SweepError, match="another space file or config"):
        open_study(open_storage(spec), "shared", space, "other-key")
