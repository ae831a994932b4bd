#!/usr/bin/env bash
# GPU machine check (no network needed): install wheels from a local folder if given, build the CUDA
# extension, run the `gpu` test suite demanding a GPU, run the benchmarks, and copy logs and JSON to
# OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR [WHEEL_DIR]
#
# Environment:
#   TEST_FILES   "path[:timeout_s] ..." run one pytest per entry, so a slow or failing file cannot hide
#                the rest (default: "tests", the whole suite in one run, no timeout); at the timeout
#                pytest is interrupted and still prints its failures
#   PYTEST_ARGS  extra pytest arguments;  BENCH_ARGS  arguments of `python -m m1_kernels.bench` (e.g. "--only decode")
#   SKIP_TESTS=1 / SKIP_BENCH=1 to run one half;  M1_HYPOTHESIS_EXAMPLES  examples per property test
#   SWEEPS=1     also run the tiling sweeps (bench.sweep_decode, bench.sweep_prefill) into sweeps.log;
#                SWEEPS="sweep_decode" runs the named ones
#   PREBUILT     an m1_kernels/_cuda*.so built by an earlier run of this script from the same csrc/ (it
#                copies the one it builds to OUTDIR): skips the ~2 min CUTLASS build
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: gpu_check.sh OUTDIR [WHEEL_DIR]}
WHEELS=${2:-}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0

if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/m1-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/m1-site:${PYTHONPATH:-}
fi
{
  echo "== $(date -u) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if [ -n "${PREBUILT:-}" ]; then
    echo "== prebuilt extension $PREBUILT"
    cp "$PREBUILT" m1_kernels/
    M1_BUILD_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -1
  else
    echo "== build"
    time python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | grep -vE "^\s*$" | tail -5
    cp m1_kernels/_cuda*.so "$OUTDIR/"
  fi
} 2>&1 | tee "$LOG"
python3 -c "import m1_kernels._cuda as e; print('extension archs', e.compiled_archs, 'devices', e.device_count())" \
  2>&1 | tee -a "$LOG" || exit 1

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  for entry in ${TEST_FILES:-tests}; do
    path=${entry%%:*}; limit=${entry#*:}; [ "$limit" = "$entry" ] && limit=0
    echo "== tests $path (M1_REQUIRE_GPU=1, $(date +%T), limit ${limit}s)" | tee -a "$LOG"
    M1_REQUIRE_GPU=1 HYPOTHESIS_PROFILE=gpu timeout -s INT "$limit" python3 -m pytest "$path" -v -p no:cacheprovider \
      -rfE --tb=short ${PYTEST_ARGS:-} 2>&1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== bench ($(date +%T))" | tee -a "$LOG"
  python3 -m m1_kernels.bench --out "$OUTDIR/bench" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  # The device tool returns few files: pack the plots, keep the JSON loose.
  (cd "$OUTDIR/bench" && ls *.png >/dev/null 2>&1 && tar czf ../plots.tar.gz *.png && rm -f *.png)
fi
if [ "${SWEEPS:-0}" != 0 ]; then
  [ "$SWEEPS" = 1 ] && SWEEPS="sweep_decode sweep_prefill"
  for sweep in $SWEEPS; do
    echo "== bench.$sweep ($(date +%T))" | tee -a "$OUTDIR/sweeps.log"
    python3 -m m1_kernels.bench.$sweep 2>&1 | tee -a "$OUTDIR/sweeps.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi
exit $status
