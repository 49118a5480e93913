#!/usr/bin/env bash
# The system packages only the tests need: Debian's chromium (the page's browser tests) and
# postgresql (the store on a real PostgreSQL server). Installed with apt-get when running as
# root; otherwise says what is missing (those tests then fail or skip, naming the package).
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "test setup: could not install ${missing[*]}; the tests that need them will say so" >&2
else
    echo "test setup: install Debian's ${missing[*]} (apt-get install ${missing[*]}) for the browser and PostgreSQL tests" >&2
fi
