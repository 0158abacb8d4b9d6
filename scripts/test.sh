#!/usr/bin/env bash
# Set up, then run the test suite (slow and GPU checks are deselected; add `-m slow` to run them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d -t speedray-XXXX)}
exec .venv/bin/python -m pytest "$@"
