"""launch/slurm.sbatch on a real one-node Slurm cluster that this module starts and stops.

The cluster (munged on its own socket, slurmctld, slurmd) lives in a temporary folder, listens on
free ports and is stopped by PID at the end, so it never touches a Slurm or munge that the machine
already runs. Where Slurm or munge is missing and cannot be installed, or the daemons do not come
up, every test here is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import DS_CONFIG, REPO

SBATCH = REPO / "launch" / "slurm.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> list[str]:
    return [
        d for d in DAEMONS if shutil.which(d, path=os.environ["PATH"] + ":/usr/sbin:/sbin") is None
    ]


def _ensure_installed() -> None:
    """Install slurm-wlm and munge through apt when they are missing and we are root; else skip."""
    if not _missing():
        return
    if os.geteuid() != 0:
        pytest.skip(f"Slurm/munge not installed ({', '.join(_missing())}) and not root to install")
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm/munge not installed ({', '.join(_missing())}) and no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(
            APT_INSTALL, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            proc = subprocess.run(
                APT_INSTALL, env=env, capture_output=True, text=True, timeout=600, check=False
            )
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get install slurm-wlm munge did not finish in 600 s")
    if proc.returncode != 0 or _missing():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        pytest.skip(f"apt-get install slurm-wlm munge failed (rc {proc.returncode}): {tail}")


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin:/sbin")
    assert found is not None, name
    return found


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, everything under `root`, stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------------------- start/stop

    def env(self, **extra: str) -> dict[str, str]:
        # No SLURM_*/SBATCH_*/SRUN_* from outside (e.g. a suite run inside a Slurm job): they are
        # input variables of sbatch and srun and would point them at another job or partition.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env["PATH"] + ":/usr/sbin:/sbin"
        env.update(extra)
        return env

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        with open(self.root / f"{name}.out", "w") as log:
            self.procs[name] = subprocess.Popen(
                cmd,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )

    def _start_munged(self) -> None:
        # Our own munged on our own socket: a munged left over from an earlier run (or the
        # machine's own) keeps its default socket and is neither reused nor touched.
        d = self.munge_socket.parent
        d.mkdir(parents=True)
        try:
            munge = pwd.getpwnam("munge")
        except KeyError:
            munge = None
        cmd = [
            _which("munged"),
            "--foreground",
            f"--socket={self.munge_socket}",
            f"--pid-file={d / 'munged.pid'}",
            f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ]
        kwargs = {}
        if munge is not None and os.geteuid() == 0:  # munged will not run as root
            os.chown(d, munge.pw_uid, munge.pw_gid)
            kwargs = {"user": munge.pw_uid, "group": munge.pw_gid, "extra_groups": []}
        self._spawn("munged", cmd, **kwargs)
        self._wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")

    def _write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        probe = subprocess.run(
            [_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30, check=False
        )
        m = re.search(r"\bCPUs=(\d+)", probe.stdout)
        if m:
            cpus = int(m.group(1))
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        r = self.root
        self.conf.write_text(
            f"""\
ClusterName=dsunlearn-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
KillWait=30
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self) -> None:
        self._start_munged()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-c", "-f", str(self.conf)])
        self._wait(self._node_idle, 60, "the node did not become idle")

    def stop(self) -> None:
        """Cancel every job, SIGKILL what is left of them, then stop our daemons by PID."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    [_which("scancel"), "--user", pwd.getpwuid(os.geteuid()).pw_name],
                    env=self.env(),
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            deadline = time.monotonic() + 15
            while self._job_processes() and time.monotonic() < deadline:
                time.sleep(0.5)
        for pid in self._job_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def _job_processes(self) -> list[int]:
        """Processes of our jobs: slurmstepd and what it runs, found by this cluster's SLURM_CONF
        in their environment (slurmd daemonises them; they are nobody's children here)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        daemons = {p.pid for p in self.procs.values()}
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or daemons & {
                    proc.pid,
                    *(p.pid for p in proc.parents()),
                }:
                    continue  # a daemon or its helper (slurmctld's slurmscriptd)
                if mine in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
                    found.append(proc.pid)
            except (psutil.Error, OSError):
                continue
        return found

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        raise RuntimeError(f"{what}; {self.diagnose()}")

    def diagnose(self) -> str:
        lines = []
        for name, proc in self.procs.items():
            state = "running" if proc.poll() is None else f"exited {proc.returncode}"
            out = (self.root / f"{name}.out").read_text(errors="replace").strip()[-600:]
            lines.append(f"{name}: {state} {out}")
        for log in ("slurmctld.log", "slurmd.log"):
            p = self.root / log
            if p.exists():
                lines.append(f"{log}: " + p.read_text(errors="replace")[-800:])
        return " | ".join(lines)

    def _node_idle(self) -> bool:
        proc = self.scontrol("show", "node", self.node, check=False)
        return proc.returncode == 0 and re.search(r"State=IDLE\b", proc.stdout) is not None

    # ----------------------------------------------------------------------------- jobs

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_which("scontrol"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        proc = subprocess.run(
            [_which("sbatch"), "--parsable", *args],
            env=self.env(**env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job leaves PENDING/RUNNING/COMPLETING; cancel it at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
                return info
            time.sleep(1)
        subprocess.run([_which("scancel"), str(job_id)], env=self.env(), timeout=30, check=False)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")

    def scancel(self, *args: str) -> None:
        subprocess.run([_which("scancel"), *args], env=self.env(), timeout=30, check=True)


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    _ensure_installed()
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs (not root here)")
    # Not under pytest's tmp_path: that is private to root (0700) and munged runs as `munge`.
    root = Path(tempfile.mkdtemp(prefix="dsunlearn-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"could not start a one-node Slurm cluster: {e}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------- the jobs

JOB_TIMEOUT = 420  # s; a 2-rank tiny run takes 30-60 s here, more while other tests share cores


def _has_resume_key() -> bool:
    from dsunlearn.config import UnlearnConfig

    return hasattr(UnlearnConfig(), "resume")


def _submit(
    slurm: SlurmCluster, out: Path, bench: Path, vanilla: Path, name: str, *extra: str
) -> int:
    """launch/slurm.sbatch for 2 CPU ranks on the one node: `dsunlearn unlearn` with GA."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "DSUNLEARN_RANKS_PER_NODE": "2",
        "DSUNLEARN_REPO": str(REPO),
        "DSUNLEARN_VENV": str(Path(sys.executable).parent.parent),
        "DSUNLEARN_MASTER_PORT": str(_free_port()),
    }
    if not _has_resume_key():
        env["DSUNLEARN_RESUME"] = ""  # dsunlearn without `resume` would refuse resume=auto
    overrides = [
        f"name={name}",
        f"out_dir={out}",
        f"data.path={bench}",
        f"vanilla={vanilla}",
        f"deepspeed={DS_CONFIG}",
        "methods=[ga]",
        "optim.batch_size=4",
        "eval.enabled=false",
        *extra,
    ]
    args = ["--cpus-per-task=2", f"--output={out}/job-%j.out", "--time=30", str(SBATCH)]
    return slurm.sbatch([*args, str(REPO / "configs" / "demo.yaml"), *overrides], env, REPO)


def _log(out: Path, job_id: int) -> str:
    p = out / f"job-{job_id}.out"
    return p.read_text(errors="replace")[-4000:] if p.exists() else "(no job output)"


def _exit_code(info: dict[str, str]) -> int:
    return int(info["ExitCode"].split(":")[0])


def _latest_step(run: Path) -> int:
    """The step of the newest complete checkpoint of GA (0: none yet)."""
    pointer = run / "checkpoints" / "ga" / "latest"
    if not pointer.exists():
        return 0
    m = re.search(r"(\d+)$", pointer.read_text().strip())
    return int(m.group(1)) if m else 0


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_preempted_job_exits_75_and_the_resubmitted_job_resumes(
    slurm, tmp_path, small_bench, random_vanilla
):
    """launch/slurm.sbatch runs `dsunlearn unlearn` on 2 ranks of the one node. USR1 to the
    batch shell only (as `--signal=B:USR1@T` does before the time limit): the ranks save one
    checkpoint together and the job exits 75; the same job submitted again continues from that
    checkpoint, finishes and writes the report."""
    steps = 30  # the signal goes out as step 2's checkpoint appears: long before the end
    extra = (f"optim.steps={steps}", "checkpoint.every=2")
    run = tmp_path / "long"
    job = _submit(slurm, tmp_path, small_bench, random_vanilla, "long", *extra)
    deadline = time.monotonic() + JOB_TIMEOUT
    while _latest_step(run) == 0:  # running, and past its first checkpoint
        info = slurm.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info}\n{_log(tmp_path, job)}"
        assert time.monotonic() < deadline, (
            f"no checkpoint in {JOB_TIMEOUT} s\n{_log(tmp_path, job)}"
        )
        time.sleep(0.2)
    slurm.scancel("--batch", "--signal=USR1", str(job))

    info = slurm.wait_job(job, JOB_TIMEOUT)
    log = _log(tmp_path, job)
    assert _exit_code(info) == 75, f"{info}\n{log}"
    assert "1 node(s) x 2 rank(s)" in _read(tmp_path / f"job-{job}.out"), log  # the log's head
    assert "got SIGUSR1" in log and "preempted" in log, log
    stopped_at = _latest_step(run)
    assert 0 < stopped_at < steps, log
    assert not (run / "report.json").exists()

    again = _submit(slurm, tmp_path, small_bench, random_vanilla, "long", *extra)
    info = slurm.wait_job(again, JOB_TIMEOUT)
    log = _log(tmp_path, again)
    assert info["JobState"] == "COMPLETED" and _exit_code(info) == 0, f"{info}\n{log}"
    report = json.loads((run / "report.json").read_text())
    assert report["resumed"] == {"ga": {"from_step": stopped_at}}, report.get("resumed")
    assert report["world_size"] == 2 and list(report["methods"]) == ["ga"], report


SWEEP_SBATCH = REPO / "launch" / "sweep.sbatch"
SWEEP_SPACE = """\
method: ga
params:
  optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
fixed: {optim.steps: 8, optim.batch_size: 4, eval.every: 2, eval.max_items: 24}
pruner: none
sampler: {type: tpe, seed: 0}
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_array_ends_the_study_although_a_task_is_killed(
    slurm, tmp_path, small_bench, random_vanilla
):
    """launch/sweep.sbatch as a 2-task array, each task a worker of one study (1 rank per
    trial); task 1 is killed (`scancel --full --signal=KILL`) while its trial is mid-run. That
    trial ends failed (Slurm's SIGTERM reaches the run first, which saves a checkpoint; had the
    worker died outright, task 0 would find it gone); task 0 runs it again in the same folder
    and ends the study with 2 complete trials."""
    space = tmp_path / "space.yaml"
    space.write_text(SWEEP_SPACE)
    env = {
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "DSUNLEARN_RANKS": "1",
        "DSUNLEARN_REPO": str(REPO),
        "DSUNLEARN_VENV": str(Path(sys.executable).parent.parent),
    }
    overrides = [
        f"out_dir={tmp_path}",
        f"data.path={small_bench}",
        f"vanilla={random_vanilla}",
        f"deepspeed={DS_CONFIG}",
        "report_to=[]",
        "eval.val_max_items=12",
    ]
    args = ["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/sweep-%A_%a.out"]
    args += ["--time=30", str(SWEEP_SBATCH), str(REPO / "configs" / "demo.yaml"), str(space), "2"]
    job = slurm.sbatch([*args, *overrides], env, REPO)
    sweep = tmp_path / "sweeps" / "demo-ga"
    out1 = tmp_path / f"sweep-{job}_1.out"

    deadline = time.monotonic() + JOB_TIMEOUT
    number = None
    while (
        number is None
        or not (sweep / "trials" / f"trial-{number:04d}" / "val_curve.jsonl").exists()
    ):
        assert time.monotonic() < deadline, f"task 1 never ran a trial\n{_read(out1)}"
        m = re.search(r"trial (\d+): \{'optim.lr'", _read(out1))
        number = int(m.group(1)) if m else None
        time.sleep(0.3)
    slurm.scancel("--full", "--signal=KILL", f"{job}_1")

    info = slurm.wait_job(f"{job}_0", JOB_TIMEOUT)  # the array's first task
    log0 = _read(tmp_path / f"sweep-{job}_0.out")
    assert info["JobState"] == "COMPLETED" and _exit_code(info) == 0, f"{info}\n{log0}"
    assert "done: the study is finished" in log0, log0
    s = json.loads((sweep / "sweep.json").read_text())
    assert s["counts"]["complete"] == 2, s["counts"]
    killed = next(t for t in s["trials"] if t["number"] == number)
    assert killed["state"] == "fail" and killed["failed_because"], killed
    retry = next(t for t in s["trials"] if t["retry_of"] == number)
    assert retry["state"] == "complete" and retry["params"] == killed["params"]
    assert retry["run"] == killed["run"]
    if "checkpoint" in killed["failed_because"]:  # it saved one: the retry went on from it
        assert "resuming from" in _read(sweep / "trials" / f"{retry['run']}.log")
    assert s["chosen"]["test"], s["chosen"]


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""
