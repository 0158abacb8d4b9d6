#!/usr/bin/env bash
# Set up, then run the whole SPEED loop on the embedded default: local Ray, configs/tiny.yaml, offline models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d -t speedray-XXXX)}
exec .venv/bin/speed-ray run configs/tiny.yaml "$@"
