#!/usr/bin/env bash
# Make .venv with everything the tests and benchmarks need, then install this package into it
# (editable), compiling the CUDA extension when nvcc is found. Used by test.sh and bench.sh.
#
# Re-runs skip what is done: the pinned packages are installed once per requirement list (a stamp in
# .venv), and the CUDA extension is rebuilt only when csrc/, setup.py, nvcc, the target archs or the
# build dependencies changed (a stamp beside m1_kernels/_cuda*.so). M1_BUILD_CUDA=0 skips the
# extension; MAX_JOBS bounds the parallel nvcc processes (each takes ~5 GB for the CUTLASS files).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[bootstrap] $*"; }
quietly() {  # run a command, print its output only when it fails
  local out
  if ! out=$("$@" 2>&1); then echo "$out"; return 1; fi
}

if [ -x .venv/bin/python ]; then
  say ".venv exists"
else
  say "creating .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
fi
PY=.venv/bin/python
PIP="$PY -m pip --disable-pip-version-check"

# torch first, pinned, so nothing later pulls a CUDA build (2.13.0 is a CPU wheel on CI's disk).
TORCH="torch==2.13.0"
REQUIREMENTS="triton==3.6.0 numpy safetensors tqdm setuptools>=64 wheel pybind11 ninja hypothesis pytest pytest-xdist
pytest-benchmark transformers==5.23.0 matplotlib"
CUTLASS="nvidia-cutlass==4.2.0.0"   # headers only: installed without its Python dependencies
STAMP=.venv/.m1-requirements
all_present() {  # every listed distribution installed (at the pinned version where there is one)
  $PY - "$@" <<'EOF'
import importlib.metadata as md, re, sys
for req in sys.argv[1:]:
    name, _, pinned = req.partition("==")
    try:
        version = md.version(re.split(r"[<>=!~]", name)[0])
    except md.PackageNotFoundError:
        sys.exit(1)
    if pinned and version.split("+")[0] != pinned:
        sys.exit(1)
EOF
}
# shellcheck disable=SC2086
if [ "$(cat "$STAMP" 2>/dev/null)" = "$TORCH $REQUIREMENTS $CUTLASS" ] && all_present $TORCH $REQUIREMENTS $CUTLASS; then
  say "pinned packages already installed"
else
  say "installing $TORCH, then the test and benchmark dependencies (first run: a few minutes)"
  quietly $PIP install -q --upgrade pip
  quietly $PIP install -q "$TORCH"
  # shellcheck disable=SC2086
  quietly $PIP install -q $REQUIREMENTS
  quietly $PIP install -q --no-deps "$CUTLASS"
  echo "$TORCH $REQUIREMENTS $CUTLASS" > "$STAMP"
fi

editable_install() {  # $1: M1_BUILD_CUDA for setup.py
  M1_BUILD_CUDA=$1 quietly $PIP install -q --no-build-isolation --no-deps -e .
}
ARCHS=${M1_CUDA_ARCHS:-90a}
NVCC=""
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC=$CUDA_HOME/bin/nvcc; else NVCC=$(command -v nvcc || true); fi
CUDA_STAMP=m1_kernels/.cuda-build-stamp
built() { compgen -G "m1_kernels/_cuda*.so" >/dev/null; }

if [ "${M1_BUILD_CUDA:-1}" = 0 ] || [ -z "$NVCC" ]; then
  why="M1_BUILD_CUDA=0"; [ -z "$NVCC" ] && why="no nvcc found"
  say "installing m1_kernels without the CUDA extension ($why; the triton and torch backends work)"
  built && say "note: keeping the existing $(compgen -G 'm1_kernels/_cuda*.so'), built earlier"
  editable_install 0
else
  # Everything the extension's binary depends on; the stamp also records the .so it was written for
  # (name, size, mtime): it matches only the very file built from these inputs.
  inputs=$({ find csrc -type f | LC_ALL=C sort | xargs sha256sum; sha256sum setup.py; "$NVCC" --version
             echo "archs=$ARCHS cuda_home=${CUDA_HOME:-}"
             $PY -c "import importlib.metadata as md, sys; print(sys.version, *(md.version(d) for d in ('pybind11', 'nvidia-cutlass')))"
           } | sha256sum | cut -d' ' -f1)
  so_id() { stat -c '%n %s %Y' m1_kernels/_cuda*.so; }
  if built && [ "$(cat "$CUDA_STAMP" 2>/dev/null)" = "$inputs $(so_id)" ]; then
    say "CUDA extension up to date ($(compgen -G 'm1_kernels/_cuda*.so'), sm_${ARCHS//;/, sm_})"
    editable_install 0
  else
    if [ -z "${MAX_JOBS:-}" ]; then  # one nvcc per ~6 GB of available memory, at most one per core
      mem_gb=$(awk '/MemAvailable/ {print int($2 / 1048576)}' /proc/meminfo)
      MAX_JOBS=$(( mem_gb / 6 < $(nproc) ? mem_gb / 6 : $(nproc) )); [ "$MAX_JOBS" -ge 1 ] || MAX_JOBS=1
      export MAX_JOBS
    fi
    say "building the CUDA extension for sm_${ARCHS//;/, sm_} with $NVCC, $MAX_JOBS job(s) (about 2-3 min; M1_BUILD_CUDA=0 skips it)"
    editable_install 1
    if built; then
      echo "$inputs $(so_id)" > "$CUDA_STAMP"
      say "built $(compgen -G 'm1_kernels/_cuda*.so')"
    else
      say "setup.py found no usable CUDA toolkit: installed without the CUDA extension"
    fi
  fi
fi
