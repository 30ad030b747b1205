#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and prints its path on the last line.
# The venv lives outside the clone, keyed by a hash of the requirements files, and is built from
# nothing when absent. Usage: VENV=$(bash scripts/env.sh [dev] | tail -n 1)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind="${1:-run}"
files=("$root/requirements.txt")
[ "$kind" = dev ] && files+=("$root/requirements-ray.txt" "$root/requirements-dev.txt")
hash=$(cat "${files[@]}" | sha256sum | cut -c1-16)
base="${CHIPS_VENV_HOME:-$HOME/.cache/chips-studio}"
venv="$base/venv-$kind-$hash"
if [ ! -f "$venv/.complete" ]; then
  echo "building $venv (first run only)" >&2
  rm -rf "$venv"
  mkdir -p "$base"
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "${files[-1]}" >&2
  touch "$venv/.complete"
fi
# The project is installed editable for the `chips` command; scripts also put the checkout first on
# PYTHONPATH, so a venv shared by several checkouts always runs the calling one.
if [ "${CHIPS_SKIP_EDITABLE:-0}" != 1 ]; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
