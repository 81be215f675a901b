#!/usr/bin/env bash
# Here, before a GPU call: the Python packages the lent machine's image lacks (or has at another
# version than setup.py pins), as wheels in .whl/ (git-ignored), for `run(carry=[".whl"])`.
# benchmarks/gpu_check.sh installs them there with pip --no-index --no-deps --target /tmp/site.
#
#   bash benchmarks/gpu_wheels.sh            # from the repository root; PyPI must be reachable
#
# The image (Python 3.12, torch, triton, transformers, peft, pyarrow, pandas, ninja, psutil, ...:
# /work/.library/device/KINDS.md) lacks deepspeed and its pydantic, datasets' dill and
# multiprocess, optuna's alembic, SQLAlchemy, Mako and colorlog, and liger-kernel (the
# benchmark's peer); transformers, tokenizers and peft come at this repository's pins. Versions
# are those of .venv, so both machines run the same code. About 20 MB.
set -eu
W=.whl
PIP="${PIP:-.venv/bin/python -m pip}"
pin() { .venv/bin/python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
rm -rf "$W" && mkdir -p "$W"
PURE=(deepspeed hjson transformers tokenizers peft datasets dill pydantic annotated-types
    typing-inspection optuna alembic Mako colorlog)
SPECS=()
for name in "${PURE[@]}"; do SPECS+=("$(pin "$name")"); done
# Pure-Python ones from their sdist or wheel (deepspeed and hjson are sdists on PyPI).
$PIP wheel -q --no-deps -w "$W" "$(pin deepspeed)" "$(pin hjson)" liger-kernel
# Binary ones for the image's CPython 3.12 on x86-64.
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$W" \
    "${SPECS[@]:2}" "$(pin pydantic_core)" "$(pin multiprocess)" "$(pin SQLAlchemy)"
ls -1 "$W"
du -sh "$W"
