#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the demo.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
# One torch thread per process: the demo runs the API, a worker and the zoo build side by side.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/evomerge demo --out demo-out "$@"
