#!/usr/bin/env bash
# The test command: install what is needed, then run the suite. Extra arguments go to pytest; when
# they name test paths (`bash scripts/test.sh -x tests/test_wheel.py`) only those run, else all of tests/.
# The whole suite runs on every core through pytest-xdist (-n auto) unless the arguments say -n or -p.
# On a machine without a GPU, Triton kernels run under TRITON_INTERPRET=1 and `gpu` tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1

paths=() parallel=(-n auto --dist loadgroup)
for arg in "$@"; do
  [ -e "${arg%%::*}" ] && [[ "$arg" != -* ]] && paths+=("$arg")
  [[ "$arg" == -n* || "$arg" == -p* || "$arg" == --numprocesses* ]] && parallel=()
done
[ ${#paths[@]} -gt 0 ] && parallel=()   # a few chosen files: worker start-up would cost more than it saves
[ ${#paths[@]} -eq 0 ] && set -- tests "$@"
echo "[test] pytest $* ${parallel[*]}"
.venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): nothing matched the selection" >&2
fi
exit "$status"
