#!/usr/bin/env bash
# One GPU-machine session for development: build, then each test file on its own (so one slow or
# failing file cannot hide the rest), then chosen benchmarks; everything logged under OUTDIR.
#   bash scripts/gpu_session.sh OUTDIR WHEEL_DIR "TEST_FILE[:TIMEOUT_S] ..." "BENCH_ARGS" [EXTRA_COMMAND]
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=$1; WHEELS=$2; TESTS=$3; BENCH=$4; EXTRA=${5:-}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 M1_REQUIRE_GPU=1 HYPOTHESIS_PROFILE=gpu
python3 -m pip install -q --no-index --no-deps --target /tmp/m1-site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/m1-site:${PYTHONPATH:-}
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUTDIR/build.log" 2>&1 || { tail -30 "$OUTDIR/build.log"; exit 1; }
for entry in $TESTS; do
  f=${entry%%:*}; limit=${entry#*:}; [ "$limit" = "$entry" ] && limit=240
  echo "== $f ($(date +%T), limit ${limit}s)" >> "$OUTDIR/tests.log"
  timeout "$limit" python3 -m pytest "$f" -q -p no:cacheprovider -rfE --tb=short 2>&1 | tee -a "$OUTDIR/tests.log" | tail -3
done
[ -n "$EXTRA" ] && (eval "$EXTRA") 2>&1 | tee "$OUTDIR/extra.log" | tail -40
[ -n "$BENCH" ] && eval python3 -m bench --out "$OUTDIR/bench" --no-plots $BENCH 2>&1 | tee "$OUTDIR/bench.log" | grep -vE "^  "
exit 0
