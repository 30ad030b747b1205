#!/usr/bin/env bash
# Sets up everything the test suite needs (venv, Debian's Chromium, the test OpenID Connect provider) and
# runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m unit`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian's chromium for the browser tests" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
fi
venv=$(bash scripts/env.sh dev | tail -n 1)
# The OpenID Connect provider of the sign-in tests: oauth2-mock-server from npm, pinned by
# tests/browser/oidc/package-lock.json, installed outside the clone (keyed by the lock's hash, like the venv).
oidc_src="$root/tests/browser/oidc"
oidc_hash=$(cat "$oidc_src/package.json" "$oidc_src/package-lock.json" | sha256sum | cut -c1-16)
export CHIPS_OIDC_DIR="${CHIPS_VENV_HOME:-$HOME/.cache/chips-studio}/oidc-$oidc_hash"
if [ ! -f "$CHIPS_OIDC_DIR/.complete" ]; then
  if ! command -v npm >/dev/null; then
    echo "installing Node.js and npm for the sign-in tests" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
  fi
  echo "installing the test OpenID Connect provider into $CHIPS_OIDC_DIR" >&2
  rm -rf "$CHIPS_OIDC_DIR" && mkdir -p "$CHIPS_OIDC_DIR"
  cp "$oidc_src/package.json" "$oidc_src/package-lock.json" "$CHIPS_OIDC_DIR/"
  npm ci --prefix "$CHIPS_OIDC_DIR" --no-audit --no-fund --update-notifier=false --loglevel=error >&2
  touch "$CHIPS_OIDC_DIR/.complete"
fi
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
