#!/usr/bin/env bash
# Creates .venv and installs evomerge with its test extras (torch pinned to the CPU build by
# constraints.txt). Installs no system packages (the tests' are scripts/test_system.sh's).
# Does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# The API's client generator (tests) lives in a venv of its own: it pins typer apart from py-irt.
GENERATOR=openapi-python-client==0.29.1
stamp=.venv/.evomerge-installed
want=$( (cat pyproject.toml constraints.txt; echo "$GENERATOR") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
python3 -m venv .venv/generator
.venv/generator/bin/python -m pip install -q "$GENERATOR"
echo "$want" > "$stamp"
