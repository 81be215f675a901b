#!/usr/bin/env bash
# One node, N ranks, through the deepspeed launcher.
#   launch/local.sh N CONFIG.yaml [key=value ...]
# e.g. launch/local.sh 2 configs/demo.yaml methods=[ga] optim.lr=1e-4
# On a machine without CUDA it runs on the CPU (gloo); with CUDA, on N GPUs (NCCL).
#
# Stopping early: `kill -USR1 PID` (or `kill PID`) of this script asks the ranks to save one
# checkpoint together and exit 75; run it again with resume=auto to continue. The exit code is the
# ranks' own: 0 done, 2 bad input, 3 diverged loss, 75 stopped with a checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
nproc="$1"; config="$2"; shift 2
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
if ! "$py" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}"
fi
port="${MASTER_PORT:-$("$py" -c 'from dsunlearn.engine.dist import free_port; print(free_port())')}"

# The two launchers in between must not see the signal: DeepSpeed's runner has no handler for
# SIGUSR1 or SIGTERM (it would die and leave the ranks behind), and launch.py answers SIGTERM by
# terminating every rank. So both start with the signals ignored (the ranks inherit that until
# they install their own handlers), and this shell sends SIGUSR1 to every process below it: the
# launchers ignore it, the ranks checkpoint. Said again every 30 s in case a rank was still
# starting (its handler is idempotent). Ctrl-C reaches launch.py, which stops the ranks (they
# get SIGTERM, so they too save a checkpoint if they can within its 30 s); this shell waits.
trap '' USR1 TERM
"$(dirname "$py")/deepspeed" --num_gpus "$nproc" --master_port "$port" \
    --module dsunlearn unlearn --config "$config" "$@" &
launcher=$!

# shellcheck disable=SC2317 # run from the traps below
to_ranks() {
    "$py" -c 'import psutil, signal, sys
for p in psutil.Process(int(sys.argv[1])).children(recursive=True):
    try:
        p.send_signal(signal.SIGUSR1)
    except psutil.Error:
        pass' "$launcher" 2>/dev/null || true
}
resender=""
# shellcheck disable=SC2317
forward() {
    echo "local.sh: got SIG$1: asking the ranks to save a checkpoint and stop" >&2
    to_ranks
    if [ -z "$resender" ]; then
        (
            trap '' USR1 TERM
            while sleep 30 && kill -0 "$launcher" 2>/dev/null; do to_ranks; done
        ) &
        resender=$!
        disown "$resender"
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap ':' INT

# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting.
rc=0
while kill -0 "$launcher" 2>/dev/null; do
    if wait "$launcher"; then rc=0; else rc=$?; fi
done
if [ "$rc" -gt 128 ]; then # interrupted just as the launcher ended: its status is still stored
    if wait "$launcher" 2>/dev/null; then rc=0; else r=$?; [ "$r" -eq 127 ] || rc=$r; fi
fi
if [ -n "$resender" ]; then
    kill -KILL "$resender" 2>/dev/null || true
fi
exit "$rc"
