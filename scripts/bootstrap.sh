#!/usr/bin/env bash
# Make .venv with everything the tests and benchmarks need, then install this package into it
# (compiling the CUDA extension when nvcc is found). Safe to re-run; used by test.sh and bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned, so nothing later pulls a CUDA build (2.13.0 is a CPU wheel on CI's disk).
$PIP install -q torch==2.13.0
$PIP install -q triton==3.6.0 pybind11 ninja hypothesis pytest pytest-benchmark transformers==5.23.0 \
    safetensors matplotlib numpy
$PIP install -q --no-deps nvidia-cutlass==4.2.0.0   # headers only: its Python deps are not needed
$PIP install -q --no-build-isolation --no-deps -e .
