#!/usr/bin/env bash
# Several nodes from a hostfile, through `deepspeed --hostfile` (DeepSpeed's pdsh launcher).
#   launch/multinode.sh HOSTFILE CONFIG.yaml [key=value ...]
# e.g. launch/multinode.sh hosts.txt configs/demo.yaml methods=[ga,npo]
#
# HOSTFILE is DeepSpeed's: one node a line, `node1 slots=8`, where slots is that node's GPUs (on
# CPU-only nodes: its ranks). The first host is the rendezvous (MASTER_ADDR) unless MASTER_ADDR is
# set; MASTER_PORT defaults to DeepSpeed's 29500.
#
# What it needs, because DeepSpeed runs every node's launcher over `pdsh -R ssh` from here:
#   - pdsh installed on this machine, and passwordless ssh from it to every host (DeepSpeed checks
#     `ssh HOST hostname` before it starts);
#   - the same paths on every node: this repository, its .venv (or $PYTHON), the config, the data
#     and out_dir (a shared filesystem). Each node starts in this directory.
# No ssh between nodes (most Slurm clusters)? Use launch/slurm.sbatch instead.
#
# Environment for the other nodes: pdsh does not carry this shell's environment. DeepSpeed passes
# on NCCL*, PYTHON*, UCX*, MV2*, MLFLOW* and the lines of ~/.deepspeed_env and ./.deepspeed_env
# (KEY=value); on CPU-only nodes this script adds DS_ACCELERATOR=cpu and OMP_NUM_THREADS.
#
# Stopping early: SIGUSR1 (or SIGTERM) to any one rank, on any node, e.g.
# `kill -USR1 PID` of a `python -u -m dsunlearn` process: every rank saves one checkpoint and they
# all exit 75; run again with resume=auto to continue. Exit codes as launch/README.md.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 HOSTFILE CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
hostfile="$1"; config="$2"; shift 2
if [ ! -f "$hostfile" ]; then
    echo "$0: hostfile not found: $hostfile" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"

# The first host line (comments and blank lines skipped), as DeepSpeed reads the file.
first="$(sed -e 's/#.*//' "$hostfile" | awk 'NF { print $1; exit }')"
if [ -z "$first" ]; then
    echo "$0: no host in $hostfile" >&2
    exit 2
fi
master_addr="${MASTER_ADDR:-$first}"
master_port="${MASTER_PORT:-29500}"

if ! "$py" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # CPU nodes: say so on every node, and share each node's cores among its ranks (slots of the
    # first host, as a guess for all). DS_ENV_FILE names the file DeepSpeed reads; an absolute
    # name replaces ~/.deepspeed_env and ./.deepspeed_env, so their lines are copied in first.
    slots="$(sed -e 's/#.*//' "$hostfile" | awk -v h="$first" '$1 == h { sub(/.*slots=/, ""); print $1; exit }')"
    slots="${slots:-1}"
    threads="${OMP_NUM_THREADS:-$(( $(nproc) / slots > 0 ? $(nproc) / slots : 1 ))}"
    env_file="$(mktemp "${TMPDIR:-/tmp}/dsunlearn-deepspeed-env.XXXXXX")"
    trap 'rm -f "$env_file"' EXIT
    for f in "$HOME/.deepspeed_env" "./.deepspeed_env"; do
        if [ -f "$f" ]; then grep '=' "$f" >>"$env_file" || true; fi
    done
    echo "DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}" >>"$env_file"
    echo "OMP_NUM_THREADS=$threads" >>"$env_file"
    export DS_ENV_FILE="$env_file" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="$threads"
fi
export PYTHONUNBUFFERED=1

# Not `exec`: the EXIT trap removes the env file. DeepSpeed's runner exits with the ranks' code.
rc=0
"$(dirname "$py")/deepspeed" --hostfile "$hostfile" --master_addr "$master_addr" \
    --master_port "$master_port" --module dsunlearn unlearn --config "$config" "$@" || rc=$?
exit "$rc"
