#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run of at most 8 minutes on one H100/H200 (made
# for one call of a lent machine; CI never runs it, and no test needs it).
#
#   bash benchmarks/gpu_wheels.sh                     # here, once: .whl/ with what the image lacks
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # there, from the repository root
#
# Steps, in priority order (each under its own time cap, so one hung or failed step leaves the
# others' results; BUDGET_S, default 450, bounds the whole run and later steps are skipped when
# it is spent):
#   wheels     .whl/*.whl into /tmp/site (deepspeed, hjson, liger-kernel, the pinned
#              transformers and datasets, ... : benchmarks/gpu_wheels.sh lists them)
#   pytest     `pytest -m gpu`: every kernel test on the "cuda" device (Triton compiled, not
#              interpreted) and the 1-rank bf16 engine test through the real launcher
#   dmk        bench_dmk_ce: eager, torch.compile, Liger and ours at V = 32000 and 151936
#   mask       bench_mask_apply at 1e7..1e9 elements
#   logits     bench_logits_memory on CUDA: eager vs chunked ops, B*T = 4096, V = 151936
#   demo       a 1-rank bf16 demo (`dsunlearn demo --ranks 1`), flash-attn if importable
#   correct    benchmarks/gpu_check.py: both kernels against float64, if time is left
# $OUT gets gpu_summary.json (every step's exit status and time, the machine),
# gpu_pytest.xml, gpu_dmk_ce.json, gpu_mask_apply.json, gpu_logits_memory.json,
# gpu_demo_report.json, gpu_check.json and gpu_check.log (everything): 8 files.
set -u
OUT=${OUT:-benchmarks/results/gpu_run}
BUDGET_S=${BUDGET_S:-450}
PY=${PY:-python3}
mkdir -p "$OUT"
T0=$(date +%s)
STEPS=$OUT/.steps
: >"$STEPS"

elapsed() { echo $(($(date +%s) - T0)); }

step() { # step NAME CAP_S CMD...: under the cap and the budget left; records "NAME rc seconds"
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - $(elapsed)))
    if [ "$left" -lt 30 ]; then
        echo "=== [$name] skipped: $left s of the budget left"
        echo "$name skipped 0" >>"$STEPS"
        return 0
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "=== [$name] start at +$(elapsed) s, cap $cap s: $*"
    local t=$(date +%s)
    timeout "$cap" "$@"
    local rc=$?
    echo "$name $rc $(($(date +%s) - t))" >>"$STEPS"
    echo "=== [$name] rc=$rc at +$(elapsed) s"
    return $rc
}

run_all() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
    if [ -d .whl ]; then
        step wheels 90 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
    $PY -c "import torch, triton, transformers, platform; print('python', \
platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"

    step pytest 200 $PY -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra --durations=8" \
        --junitxml="$OUT/gpu_pytest.xml" tests/
    step dmk 110 $PY benchmarks/bench_dmk_ce.py --device cuda --impls eager,compile,liger,ours \
        --vocabs 32000,151936 --ns 4096 --out "$OUT/gpu_dmk_ce.json" --plot /tmp/gpu_dmk_ce.png
    step mask 45 $PY benchmarks/bench_mask_apply.py --device cuda --sizes 1e7,1e8,1e9 \
        --densities 0.01,0.5 --out "$OUT/gpu_mask_apply.json"
    step logits 60 $PY benchmarks/bench_logits_memory.py --device cuda --dtypes bf16,fp32 \
        --repeats 3 --out "$OUT/gpu_logits_memory.json"
    step demo 150 $PY -m dsunlearn demo --ranks 1 name=gpu_demo out_dir=/tmp/gpu_runs \
        data.root=/tmp/gpu_data model.dtype=bf16 deepspeed=configs/deepspeed/zero3_bf16.json \
        report_to=[] &&
        cp /tmp/gpu_runs/gpu_demo/report.json "$OUT/gpu_demo_report.json"
    step correct 100 $PY benchmarks/gpu_check.py --out "$OUT/gpu_check.json"

    $PY - "$STEPS" "$OUT/gpu_summary.json" <<'EOF'
import json, platform, sys, torch
rows = [line.split() for line in open(sys.argv[1]) if line.strip()]
steps = {n: {"rc": rc if rc == "skipped" else int(rc), "s": int(s)} for n, rc, s in rows}
attn = "flash_attention_2" if __import__("importlib").util.find_spec("flash_attn") else "sdpa"
json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "python": platform.python_version(), "attention": attn, "steps": steps},
          open(sys.argv[2], "w"), indent=1)
print(json.dumps(steps))
EOF
    echo "=== done at +$(elapsed) s"
}

run_all 2>&1 | tee "$OUT/gpu_check.log"
rm -f "$STEPS"
