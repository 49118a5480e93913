#!/usr/bin/env bash
# Runs the test suite; sets up .venv first when it is missing or stale.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh >&2
bash scripts/test_system.sh >&2
# One BLAS/OpenMP thread per process: the tests run servers and workers side by side on a
# small machine, where oversubscribed torch threads were measured up to 100x slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# --fast: the development lane (no model training, no servers, no browser; about 2 minutes)
if [[ "${1:-}" == "--fast" ]]; then
    shift
    set -- -m "not slow and not service and not browser and not gpu" "$@"
fi
exec .venv/bin/python -m pytest "$@"
