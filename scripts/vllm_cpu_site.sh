#!/usr/bin/env bash
# vLLM's Python package for the CPU rehearsal (tests/test_rehearsal_vllm.py): the vllm wheel installed --no-deps,
# with the few packages its parameter classes import, into .cache/vllm-site (outside .venv: vllm's own deps would
# replace the CPU torch). vLLM's engine cannot run without CUDA; its SamplingParams, StructuredOutputsParams,
# LoRA helpers and xgrammar validation do. Prints the SPEED_RAY_VLLM_SITE value, or nothing if pip fails
# (the vLLM-object checks then skip and the rest of the rehearsal still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
VLLM=${VLLM_VERSION:-0.32.0}
site=.cache/vllm-site/vllm-$VLLM deps=.cache/vllm-site/deps-$VLLM
if [ ! -f "$site/.complete" ]; then
  rm -rf "$site" && .venv/bin/python -m pip install -q --no-deps --no-compile --target "$site" "vllm==$VLLM" >&2 \
    && touch "$site/.complete" || { echo "vllm_cpu_site: could not install vllm==$VLLM" >&2; exit 0; }
fi
if [ ! -f "$deps/.complete" ]; then
  rm -rf "$deps" && .venv/bin/python -m pip install -q --no-deps --no-compile --target "$deps" \
    "msgspec==0.23.0" "cbor2==6.3.0" "pyzmq==27.3.0" "openai-harmony==0.0.8" "pybase64==1.5.1" "cachetools==8.0.2" \
    "py-cpuinfo==9.0.0" "partial-json-parser==0.2.1.1.post7" "llguidance==1.7.6" >&2 \
    && touch "$deps/.complete" || { echo "vllm_cpu_site: could not install vllm's import deps" >&2; exit 0; }
fi
echo "$PWD/$site:$PWD/$deps"
