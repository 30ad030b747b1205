#!/usr/bin/env bash
# Sets up the runtime venv and opens the dashboard on the bundled demo workspace (offline).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv=$(bash scripts/env.sh | tail -n 1)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/streamlit" run app/main.py "$@"
