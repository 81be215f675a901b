"""Process-group set-up that works the same in one process and under `deepspeed --num_gpus N`.

On a machine without CUDA this selects DeepSpeed's CPU accelerator and the gloo backend;
with CUDA, NCCL. A plain `python` process becomes a world of size 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch


def free_port() -> int:
    """A TCP port that is free right now on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_accelerator_env() -> None:
    """Pick DeepSpeed's accelerator before deepspeed is imported (CPU when CUDA is absent)."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None
_JOINED = False  # this process joined a process group at some point (it stays set after leaving)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    DeepSpeed's torch backend builds `deepspeed_shm_comm` (a C++ extension) when it starts on
    the CPU accelerator. The op only serves `inference_all_reduce`, which training never calls,
    yet building it costs every fresh environment a compile, and the build holds a lock file in
    ~/.cache/torch_extensions: a process killed mid-build leaves the lock, and every later start
    on that machine waits on it forever. DeepSpeed asks its cached compatibility table before
    building, so marking the op incompatible there skips the build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int = 600) -> DistInfo:
    """Join (or create) the process group; idempotent."""
    global _INFO, _JOINED
    if _INFO is not None:
        return _INFO
    prepare_accelerator_env()
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())

    import deepspeed

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        skip_shm_comm_build()
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=timedelta(seconds=timeout_s),
    )
    import torch.distributed as dist

    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)
    _JOINED = True
    _quiet_libraries(_INFO.is_main)
    return _INFO


def shutdown_distributed() -> None:
    """Leave the process group (no-op if never joined).

    Call it only where every rank got to the same point (a finished or a preempted run): a rank
    that failed alone must not wait on the others.
    """
    global _INFO
    if _INFO is None:
        return
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    if dist.is_initialized():
        ds_dist.destroy_process_group()
    _INFO = None


def exit_process(code: int, leave: bool = True) -> NoReturn:
    """End this process with `code`; one that joined a process group skips finalisation.

    Why: gloo's C++ worker threads can still hold finished collective work whose tensors belong
    to Python; releasing them while Python finalises takes the GIL from a C++ thread, and the
    process aborts (SIGABRT, "terminate called without an active exception") after its results
    are saved, turning a finished rank into a failed launch. Leaving the group first is not
    enough: DeepSpeed's engines keep their groups alive until finalisation. Writers close their
    own files; stdio and logging are flushed here. `leave=False` for a rank that failed alone.
    """
    if not _JOINED:
        sys.exit(code)
    if leave:
        shutdown_distributed()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing to lose
            stream.flush()
    os._exit(code)


def _quiet_libraries(is_main: bool) -> None:
    """Keep DeepSpeed and transformers chatter off the console; non-main ranks log warnings only."""
    # DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates, once per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING if is_main else logging.ERROR)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING if is_main else logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    import transformers

    transformers.logging.set_verbosity_error()


def get_info() -> DistInfo:
    if _INFO is None:
        raise RuntimeError("init_distributed() has not been called")
    return _INFO


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is left alone)."""
    import torch.distributed as dist

    out = t.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank: lets every rank take the same branch."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


class _StdoutHandler(logging.StreamHandler):
    """Writes to `sys.stdout` as it is at each record, not as it was when the logger was made:
    a caller that swaps stdout for a while (pytest's capture, a notebook, `dsunlearn.cli.main`
    called in process) leaves no handler on a closed stream once it puts stdout back."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass  # StreamHandler.__init__ assigns one; the current stdout is always used


def get_logger(name: str = "dsunlearn") -> logging.Logger:
    """A logger that prints on rank 0 only."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    rank = int(os.environ.get("RANK", "0"))
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    return logger
