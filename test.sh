#!/usr/bin/env bash
# Runs the test suite; sets up .venv first when it is missing or stale.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh >&2
exec .venv/bin/python -m pytest "$@"
