#!/usr/bin/env bash
# One node, N ranks, through the deepspeed launcher.
#   launch/local.sh N CONFIG.yaml [key=value ...]
# e.g. launch/local.sh 2 configs/demo.yaml methods=[ga] optim.lr=1e-4
# On a machine without CUDA it runs on the CPU (gloo); with CUDA, on N GPUs (NCCL).
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
exec "$(dirname "$py")/deepspeed" --num_gpus "$nproc" --master_port "$port" \
    --module dsunlearn unlearn --config "$config" "$@"
