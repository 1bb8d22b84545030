#!/usr/bin/env bash
# Create .venv (Python 3.11), install the CPU build of torch first, then speechinstruct with its extras.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh test,bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# CPU torch before anything that depends on torch, so pip never resolves a multi-GB CUDA build.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
fi
.venv/bin/python -m pip install -q -e ".[${extras}]" 2>&1 | grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true
.venv/bin/python -c 'import speechinstruct, torch; print("speechinstruct", speechinstruct.__version__, "torch", torch.__version__)'
