#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the demo.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/evomerge demo --out demo-out "$@"
