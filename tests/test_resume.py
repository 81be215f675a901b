"""Checkpoint, exact resume, preemption and a dead rank, on 2 real ZeRO-3 ranks.

Every run is MMUnlearner (saliency mask, masked forget steps with weight decay, retain steps:
the most state a run carries) for STEPS iterations. The reference is one uninterrupted run; the
others are cut (`checkpoint.stop_at`; SIGUSR1 on one rank, then SIGKILL of one rank), relaunched
with `resume=auto`, and must end on the reference's weights, read from the final checkpoints
with DeepSpeed's own zero_to_fp32.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dsunlearn.engine.preempt import PREEMPTED_EXIT
from dsunlearn.recipes.demo import deepspeed_launch_cmd
from tests.conftest import REPO, cli_env, run_cli, run_deepspeed, unlearn_args

STEPS = 6
pytestmark = pytest.mark.slow
DS_OFFLOAD = str(REPO / "configs" / "deepspeed" / "zero3_cpu_offload.json")


def _args(out: Path, bench: Path, vanilla: Path, name: str, *extra: str) -> list[str]:
    return unlearn_args(
        out,
        bench,
        vanilla,
        "methods=[mmunlearner]",
        f"optim.steps={STEPS}",
        "optim.batch_size=4",
        "optim.weight_decay=0.1",
        "method.mmu_max_units=2",
        "method.mmu_mask.mode=topk",  # a random model's ratio mask can be empty
        "method.mmu_retain_per_forget=1",
        "eval.enabled=false",
        "checkpoint.final=true",
        *extra,
        name=name,
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "mmunlearner"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _latest(run: Path) -> Path:
    save_dir = run / "checkpoints" / "mmunlearner"
    return save_dir / (save_dir / "latest").read_text().strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_bench, random_vanilla) -> tuple[Path, dict]:
    """The uninterrupted run, and its final weights."""
    out = tmp_path_factory.mktemp("ref")
    _ok(run_deepspeed(2, _args(out, small_bench, random_vanilla, "full"), cwd=REPO))
    return out / "full", _final_weights(out / "full")


def test_stop_and_resume_end_on_the_uninterrupted_weights(
    tmp_path, small_bench, random_vanilla, reference
):
    ref_run, ref_weights = reference
    cut = _args(tmp_path, small_bench, random_vanilla, "cut", f"checkpoint.stop_at={STEPS // 2}")
    proc = run_deepspeed(2, cut, cwd=REPO)
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr[-3000:]
    assert "relaunch with resume=auto" in proc.stderr
    run = tmp_path / "cut"
    assert _latest(run).name == f"step{STEPS // 2}" and not (run / "report.json").exists()
    # Its files: DeepSpeed's per-rank partitions, our per-rank state, the mask, the record.
    names = {p.name for p in _latest(run).iterdir()}
    for rank in (0, 1):
        assert {f"resume_rank{rank}.pt", f"mask_rank{rank}.pt"} <= names
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in names
    assert "dsunlearn.json" in names

    # Refused, each with one line and before any engine is built (1 rank is enough to see it):
    # a fresh launch into the same folder, other settings, another world size.
    for extra, message in (
        ([], "resume=auto continues it"),
        (["resume=auto", "optim.lr=1e-3"], "other settings"),
        (["resume=auto"], "written by 2 ranks and this run has 1"),
    ):
        proc = run_cli([*cut, *extra], tmp_path)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], proc.stderr

    _ok(run_deepspeed(2, [*cut, "resume=auto"], cwd=REPO))
    report = json.loads((run / "report.json").read_text())
    assert report["resumed"] == {"mmunlearner": {"from_step": STEPS // 2}}
    assert report["method_info"]["mmunlearner"]["source"] == str(
        run / "checkpoints" / "mmunlearner" / f"step{STEPS // 2}"
    )
    assert not (run / "progress.json").exists()
    ref_curve = json.loads((ref_run / "losses.json").read_text())["mmunlearner"]
    assert json.loads((run / "losses.json").read_text())["mmunlearner"] == ref_curve
    diff = _max_diff(_final_weights(run), ref_weights)
    print(f"stop at step {STEPS // 2}, resume to {STEPS}: max |w - w_ref| = {diff:.3g}")
    assert diff <= 1e-6


def test_zero_to_fp32_script_consolidates_the_final_checkpoint(tmp_path, reference):
    ref_run, ref_weights = reference
    save_dir = ref_run / "checkpoints" / "mmunlearner"
    out = tmp_path / "fp32"
    proc = subprocess.run(
        [
            sys.executable,
            str(save_dir / "zero_to_fp32.py"),
            str(save_dir),
            str(out),
            "--safe_serialization",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        state.update(load_file(str(f)))
    assert _max_diff(state, ref_weights) == 0.0


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        deepspeed_launch_cmd(2, args),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _ranks(launcher: subprocess.Popen, timeout: float = 120) -> list[psutil.Process]:
    """The two rank processes under the deepspeed launcher."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs = [  # `python -u -m dsunlearn --local_rank=R ...` (not the launchers)
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if "-m dsunlearn" in " ".join(p.cmdline())
        ]
        if len(procs) == 2:
            return procs
        time.sleep(0.5)
    raise AssertionError("the launcher did not start 2 ranks")


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step"))


def _wait_for_step(run: Path, after: int, launcher: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until `latest` names a step beyond `after`; that step."""
    pointer = run / "checkpoints" / "mmunlearner" / "latest"
    deadline = time.time() + timeout
    while not (pointer.exists() and _step_of(_latest(run)) > after):
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        assert time.time() < deadline, f"no checkpoint after step {after} appeared"
        time.sleep(0.2)
    return _step_of(_latest(run))


def _rank1(launcher: subprocess.Popen) -> psutil.Process:
    return next(p for p in _ranks(launcher) if p.environ().get("RANK") == "1")


def test_preempted_then_killed_run_resumes_to_the_same_weights(
    tmp_path, small_bench, random_vanilla, reference
):
    """SIGUSR1 to rank 1 only: both ranks checkpoint and exit 75. Relaunched, rank 1 is then
    SIGKILLed: the launcher fails fast and `latest` still names a complete checkpoint. The last
    relaunch finishes on the uninterrupted run's weights."""
    _, ref_weights = reference
    run = tmp_path / "chain"
    args = _args(
        tmp_path, small_bench, random_vanilla, "chain", "checkpoint.every=1", "dist_timeout_s=60"
    )
    launcher = _launch(args)
    _wait_for_step(run, 0, launcher)
    _rank1(launcher).send_signal(signal.SIGUSR1)
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == PREEMPTED_EXIT, out[-3000:]
    assert "signal SIGUSR1" in out  # rank 0 names the signal that reached rank 1
    preempted_at = _step_of(_latest(run))
    assert preempted_at < STEPS

    launcher = _launch([*args, "resume=auto"])
    _wait_for_step(run, preempted_at, launcher)
    t0 = time.time()
    _rank1(launcher).kill()  # SIGKILL: no handler, no checkpoint, a peer gone mid-collective
    out, _ = launcher.communicate(timeout=180)
    took = time.time() - t0
    print(
        f"SIGUSR1 after step {preempted_at}; SIGKILL of rank 1: launcher exit {launcher.returncode} after {took:.1f} s"
    )
    assert launcher.returncode not in (0, PREEMPTED_EXIT) and took < 120, out[-3000:]
    last = _latest(run)  # intact: it names a complete checkpoint
    record = json.loads((last / "dsunlearn.json").read_text())
    assert record["world_size"] == 2 and record["step"] == _step_of(last) > preempted_at

    _ok(run_deepspeed(2, [*args, "resume=auto"], cwd=REPO))
    report = json.loads((run / "report.json").read_text())
    assert report["resumed"] == {"mmunlearner": {"from_step": record["step"]}}
    diff = _max_diff(_final_weights(run), ref_weights)
    print(f"resumed from step {record['step']}: max |w - w_ref| = {diff:.3g}")
    assert diff <= 1e-6


def test_offloaded_optimizer_stop_and_resume_end_on_the_uninterrupted_weights(
    tmp_path, small_bench, random_vanilla
):
    """The same run with the optimizer offloaded (DeepSpeedCPUAdam), 3 iterations of a forget
    and a retain step, cut after the first: the resumed run's first step is the optimizer's
    third, where DeepSpeed's C++ Adam would recompute beta2^t as pow(0.999, 3), one bit off the
    running product the uninterrupted run holds. Losses and weights must match exactly."""
    offload = ("optim.steps=3", f"deepspeed={DS_OFFLOAD}")

    def args(name: str, *extra: str) -> list[str]:
        return _args(tmp_path, small_bench, random_vanilla, name, *offload, *extra)

    _ok(run_deepspeed(2, args("full"), cwd=REPO))
    cut = args("cut", "checkpoint.stop_at=1")
    proc = run_deepspeed(2, cut, cwd=REPO)
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr[-3000:]
    _ok(run_deepspeed(2, [*cut, "resume=auto"], cwd=REPO))
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["resumed"] == {"mmunlearner": {"from_step": 1}}
    curves = [json.loads((tmp_path / r / "losses.json").read_text()) for r in ("full", "cut")]
    assert curves[0]["mmunlearner"] == curves[1]["mmunlearner"]
    diff = _max_diff(_final_weights(tmp_path / "cut"), _final_weights(tmp_path / "full"))
    print(f"offloaded optimizer, stop at step 1, resume to 3: max |w - w_ref| = {diff:.3g}")
    assert diff == 0.0


def test_cpu_adam_continues_a_loaded_state_bit_for_bit(monkeypatch):
    """In one process: DeepSpeedCPUAdam as build_train_engine sets it up, 2 steps, its state
    saved and loaded into a fresh one, 2 more steps: the weights equal 4 uninterrupted steps
    exactly. Stock DeepSpeedCPUAdam does not (its third step's bias correction differs)."""
    import copy

    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from dsunlearn.engine.engine import _load_cpu_adam_op, _resume_exact_cpu_adam

    _load_cpu_adam_op()
    # DeepSpeedCPUAdam asks py-cpuinfo for the vendor on construction (about 1 s each time).
    monkeypatch.setattr("cpuinfo.get_cpu_info", lambda: {"vendor_id_raw": "any"})
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(4096, generator=gen)
    grads = [torch.randn(4096, generator=gen) for _ in range(4)]

    def steps(weights, grads, state=None, exact=True):
        p = torch.nn.Parameter(weights.clone())
        opt = DeepSpeedCPUAdam([p], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
        if exact:
            _resume_exact_cpu_adam(opt)
        if state is not None:
            opt.load_state_dict(state)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), copy.deepcopy(opt.state_dict())

    gaps = {}
    for exact in (True, False):
        full, _ = steps(w0, grads, exact=exact)
        half, state = steps(w0, grads[:2], exact=exact)
        resumed, _ = steps(half, grads[2:], state, exact=exact)
        gaps[exact] = (resumed - full).abs().max().item()
    print(f"max |w_resumed - w_full|: {gaps[True]} (build_train_engine), {gaps[False]} (stock)")
    assert gaps[True] == 0.0 and gaps[False] > 0.0
