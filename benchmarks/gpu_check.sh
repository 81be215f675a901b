#!/usr/bin/env bash
# Every GPU check of the two Triton kernels in one run (made for one call of a lent GPU machine):
# the machine, the correctness sweep (benchmarks/gpu_check.py), the kernel tests on CUDA, both
# benchmarks, the fused op's error table, a profile of the fused op (gpu_check.py --profile-dmk)
# and, if time is left, torch.compile at two sizes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root, on a GPU machine
#
# Everything lands in $OUT (default benchmarks/results/gpu_run): gpu_check_h200.json,
# mask_apply_h200.json, dmk_ce_h200.json, dmk_ce_h200.png, dmk_ce_errors_h200.json,
# dmk_profile_h200.json, dmk_ce_h200_compile.json and the whole log, gpu_check_h200.log (8 files). Each step has its own time cap
# so that one hung or failed step leaves the others' results; BUDGET_S (default 370) bounds the
# whole run (the optional compile step only runs inside it).
set -u
OUT=${OUT:-benchmarks/results/gpu_run}
BUDGET_S=${BUDGET_S:-370}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)

elapsed() { echo $(($(date +%s) - T0)); }

step() { # step NAME CAP_S CMD...
    local name=$1 cap=$2
    shift 2
    echo "=== [$name] start at +$(elapsed) s, cap $cap s: $*"
    timeout "$cap" "$@"
    local rc=$?
    echo "=== [$name] rc=$rc at +$(elapsed) s"
    return $rc
}

run_all() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv
    nproc
    $PY -c "import torch, triton, platform; print('python', platform.python_version(), \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"

    step correctness 150 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check_h200.json"
    step pytest 150 $PY -m pytest -q -p no:cacheprovider -o addopts="-ra --durations=8" \
        tests/test_kernel_dmk_ce.py tests/test_kernel_mask_apply.py -k "not subprocess"
    step mask_bench 90 $PY benchmarks/bench_mask_apply.py --device cuda \
        --sizes 1e6,1e7,1e8,1e9 --densities 0.01,0.5,0.99 --out "$OUT/mask_apply_h200.json"
    step dmk_bench 180 $PY benchmarks/bench_dmk_ce.py --device cuda --impls eager,liger,ours \
        --out "$OUT/dmk_ce_h200.json" --plot "$OUT/dmk_ce_h200.png"
    step dmk_errors 60 $PY benchmarks/dmk_ce_errors.py &&
        cp benchmarks/results/dmk_ce_errors_cuda.json "$OUT/dmk_ce_errors_h200.json"
    step dmk_profile 90 $PY benchmarks/gpu_check.py --profile-dmk "$OUT/dmk_profile_h200.json"
    local left=$((BUDGET_S - $(elapsed)))
    if [ "$left" -gt 60 ]; then
        step dmk_compile "$left" $PY benchmarks/bench_dmk_ce.py --device cuda \
            --impls eager,compile,ours --vocabs 32000,151936 --ns 4096 \
            --out "$OUT/dmk_ce_h200_compile.json" --plot /tmp/dmk_ce_h200_compile.png
    else
        echo "=== [dmk_compile] skipped: only $left s of the budget left"
    fi
    echo "=== done at +$(elapsed) s"
}

run_all 2>&1 | tee "$OUT/gpu_check_h200.log"
