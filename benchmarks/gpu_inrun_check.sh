#!/usr/bin/env bash
# In-run validation, gold_first selection, early stopping and the selected weights put back, on
# one CUDA rank (NCCL, ZeRO-3): the GPU twin of tests/test_inrun.py's SETTING, made for one call
# of a lent GPU machine.
#
#   OUT=/some/dir bash benchmarks/gpu_inrun_check.sh       # from the repository root
#
# Steps: wheels from .whl/ (if there and INSTALL_WHEELS=1) into /tmp/site; a 6-person built-in
# benchmark; a random tiny-llava folder (vanilla and gold); then, fp32 ZeRO-3
# (configs/deepspeed/zero3_cpu.json: bf16 off, every weight partitioned):
#   full  GA, 8 iterations, validation every 2, gold_first (margin 1, retain share 0: step 2 is
#         selected), patience 2 (stops after step 6), final checkpoint, TensorBoard
#   to2   GA stopped at step 2, no evaluation, final checkpoint
#   to6   GA stopped at step 6, likewise
# and, if BUDGET_S leaves time, full_bf16 and to2_bf16 (zero3_bf16.json, model.dtype=bf16).
# Last, gpu_inrun_check.py summary compares the final checkpoints' fp32 weights
# (get_fp32_state_dict_from_zero_checkpoint) and checks the report.
# $OUT gets gpu_inrun_h200.json (the summary), gpu_inrun_h200.log (everything), full_report.json
# and full_report.md (the selection run's report).
set -u
OUT=${OUT:-benchmarks/results/gpu_inrun_run}
BUDGET_S=${BUDGET_S:-270}
CAP_X=${CAP_X:-1} # multiplies every step's cap (a dry run on CPU: CAP_X=5 BUDGET_S=2000)
PY=${PY:-python3}
W=${WORK:-/tmp/dsunlearn_inrun}
mkdir -p "$OUT"
rm -rf "$W" && mkdir -p "$W"
T0=$(date +%s.%N)
TIMES=$W/times.txt

elapsed() { python3 -c "print(round($(date +%s.%N) - $T0))"; }

step() { # step NAME CAP_S CMD...: runs CMD under a time cap, records "NAME rc wall_s"
    local name=$1 cap=$(($2 * CAP_X))
    shift 2
    echo "=== [$name] start at +$(elapsed) s, cap $cap s: $*"
    local t=$(date +%s.%N)
    timeout "$cap" "$@"
    local rc=$?
    local dt=$(python3 -c "print(round($(date +%s.%N) - $t, 2))")
    echo "$name $rc $dt" >>"$TIMES"
    echo "=== [$name] rc=$rc in $dt s, at +$(elapsed) s"
    return $rc
}

SETTING=(methods=[ga] optim.steps=8 optim.batch_size=4 eval.every=2 eval.max_items=24
    select.criterion=gold_first select.forget_margin=1.0 select.retain_share=0.0
    early_stop.patience=2 checkpoint.final=true report_to=[tensorboard])

run_all() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
    nproc
    if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then
        step wheels 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    $PY -c "import torch, deepspeed, transformers, datasets, platform; print('python', \
platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__, 'transformers', \
transformers.__version__, 'datasets', datasets.__version__)"

    # `timeout` runs programs, not shell functions: the commands are arrays
    local fp32=deepspeed=configs/deepspeed/zero3_cpu.json
    local bf16=(deepspeed=configs/deepspeed/zero3_bf16.json model.dtype=bf16)
    local unl=($PY -m dsunlearn unlearn --config configs/demo.yaml "out_dir=$W"
        "data.path=$W/bench" "vanilla=$W/vanilla" "gold=$W/vanilla")
    local stop=(methods=[ga] optim.batch_size=4 eval.enabled=false checkpoint.final=true)
    step bench 60 $PY -m dsunlearn data build --out "$W/bench" --entities 6 &&
        step vanilla 60 $PY benchmarks/gpu_inrun_check.py vanilla "$W/vanilla" &&
        step full 150 "${unl[@]}" name=full $fp32 "${SETTING[@]}"
    step to2 90 "${unl[@]}" name=to2 $fp32 "${stop[@]}" optim.steps=2
    step to6 90 "${unl[@]}" name=to6 $fp32 "${stop[@]}" optim.steps=6
    local left
    left=$(python3 -c "print(int($BUDGET_S - ($(date +%s.%N) - $T0)))")
    if [ "$left" -gt 110 ]; then
        step full_bf16 $((left - 50)) "${unl[@]}" name=full_bf16 "${bf16[@]}" "${SETTING[@]}"
        left=$(python3 -c "print(int($BUDGET_S - ($(date +%s.%N) - $T0)))")
        [ "$left" -gt 45 ] &&
            step to2_bf16 $((left - 25)) "${unl[@]}" name=to2_bf16 "${bf16[@]}" "${stop[@]}" optim.steps=2
    else
        echo "=== [bf16] skipped: only $left s of the budget left"
    fi
    step summary 60 $PY benchmarks/gpu_inrun_check.py summary --work "$W" --times "$TIMES" \
        --out "$OUT/gpu_inrun_h200.json"
    cp "$W/full/report.json" "$OUT/full_report.json" 2>/dev/null
    cp "$W/full/report.md" "$OUT/full_report.md" 2>/dev/null
    echo "=== done at +$(elapsed) s"
}

run_all 2>&1 | tee "$OUT/gpu_inrun_h200.log"
