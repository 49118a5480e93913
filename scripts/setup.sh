#!/usr/bin/env bash
# Creates .venv and installs evomerge with its test extras; torch is pinned to the CPU build by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.evomerge-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
echo "$want" > "$stamp"
