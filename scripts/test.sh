#!/usr/bin/env bash
# Set up (packages + Debian's Chromium for the browser test) and run the whole test suite.
# Extra arguments go to pytest (e.g. -k similarity).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
if [ ! -x /usr/bin/chromium ]; then
  echo "==> installing Debian's chromium for the browser test"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
