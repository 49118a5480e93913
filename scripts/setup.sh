#!/usr/bin/env bash
# Creates .venv and installs evomerge with its test extras (torch pinned to the CPU build by
# constraints.txt), and Debian's Chromium for the page test. Does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "setup: could not install chromium; the page test will fail" >&2
    else
        echo "setup: install Debian's chromium package for the page test (apt-get install chromium)" >&2
    fi
fi

stamp=.venv/.evomerge-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
echo "$want" > "$stamp"
