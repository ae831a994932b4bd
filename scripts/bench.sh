#!/usr/bin/env bash
# The main job: install what is needed, then `python -m m1_kernels.bench` (arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m m1_kernels.bench "$@"
