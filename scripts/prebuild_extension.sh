#!/usr/bin/env bash
# Build m1_kernels._cuda on this machine (nvcc, no GPU needed) for another machine's Python, e.g. a GPU machine
# whose time is too short for the CUTLASS build: the extension links no libtorch (setup.py), so only the Python
# version must match. Builds the files git tracks in this working tree, in a copy kept between runs (only changed
# files recompile), and puts the .so into OUTDIR for `PREBUILT=OUTDIR/_cuda*.so bash scripts/gpu_check.sh ...`.
#
#   bash scripts/prebuild_extension.sh PYTHON OUTDIR     PYTHON: the target's version here, e.g. python3.12
#   MAX_JOBS bounds the parallel nvcc processes (each takes ~5 GB for the CUTLASS files; default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: prebuild_extension.sh PYTHON OUTDIR}
OUT=${2:?usage: prebuild_extension.sh PYTHON OUTDIR}
tag=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
VENV=/tmp/m1-prebuild-py$tag
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check pybind11 ninja "setuptools>=64" wheel
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps nvidia-cutlass==4.2.0.0
mkdir -p "$VENV/src"
# tar keeps the files' times, so ninja recompiles only what changed since the last run
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$VENV/src"
(cd "$VENV/src" && MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace)
mkdir -p "$OUT"
cp "$VENV"/src/m1_kernels/_cuda*.so "$OUT/"
ls "$OUT"/_cuda*.so
