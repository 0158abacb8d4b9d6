#!/usr/bin/env bash
# GPU check of the embedder's paper path on one GPU (H100/H200): a random ~0.9B Llama with LoRA r16, last-token
# pooling, gradient checkpointing; fp16 (GradScaler) and bf16 steps; GradCache == plain loss and gradients, both
# close to fp32; samples/s and peak GPU memory per precision. Needs torch, transformers and peft only (no Ray, no
# hub). A few minutes; bounded at 9.5 minutes. The last line printed is one JSON object; exit 0 iff it says "ok".
#   bash scripts/gpu_check.sh
#   GPU_CHECK_SIZE=tiny GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh     # CPU smoke run (tests/test_embedder_gpu_check.py)
# Env: PYTHON (default python3), GPU_CHECK_SIZE (1b|small|tiny), GPU_CHECK_DEVICE (cuda|cpu), GPU_CHECK_BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
limit=${GPU_CHECK_TIMEOUT_S:-570}
timeout --kill-after=10 "$limit" "${PYTHON:-python3}" scripts/gpu_check.py "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "{\"check\": \"embedder_gpu_path\", \"ok\": false, \"error\": \"timed out after ${limit} s\"}"
fi
exit "$rc"
