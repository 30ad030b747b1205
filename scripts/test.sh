#!/usr/bin/env bash
# Sets up everything the test suite needs (venv, Debian's Chromium) and runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m unit`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium for the browser tests" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
venv=$(bash scripts/env.sh dev | tail -n 1)
# PYTHONPATH makes every process the tests start import this checkout, whatever the venv points at.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$venv/bin/ruff" check .
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider --timeout=900 "$@"
rc=$?
set -e
# pytest exits 5 when no test ran: that is a failure too.
if [ "$rc" -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi
exit "$rc"
