#!/usr/bin/env bash
# End-to-end check on a CUDA machine, in under 8 minutes on one H100: a ~1 B-parameter
# Llama-shaped base with 3 fine-tunes (random weights + noise, built on the spot), a short
# evolve job (population 4 x 2 generations, 2 x 20 items) through the CLI, then peak GPU
# memory against the memory plan, seconds per candidate (materialize / score) and the front.
#
#   bench/gpu_check.sh            # CUDA
#   bench/gpu_check.sh --cpu      # CPU smoke test (a ~5 M parameter model, same steps)
#   bench/gpu_check.sh --params 3e8 --population 6 ...   (see bench/gpu_check.py --help)
#
# Python: $PYTHON, else .venv/bin/python, else python3. Output under bench/out/gpu_check/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
fi
exec "$PY" bench/gpu_check.py "$@"
