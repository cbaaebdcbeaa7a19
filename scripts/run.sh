#!/usr/bin/env bash
# Set up, build the default run if it is missing (with progress), and open the dashboard.
# Extra arguments go to `streamlit run` (e.g. --server.port 8600).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
.venv/bin/python -m core build --run checkpoints/default
exec .venv/bin/python -m streamlit run app.py "$@"
