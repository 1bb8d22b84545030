#!/usr/bin/env bash
# The test command: set up .venv on a fresh machine (CPU torch first), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# Debian's Chromium for the test that opens the report in a real browser (Playwright drives it; it never
# downloads a browser of its own). Needs root and apt; without them that one test is skipped, saying why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "scripts/test.sh: could not install chromium; the browser test will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two test files at a time (pytest-xdist, one file per worker: module fixtures are built once): the suite waits
# on subprocesses, servers and Ray as much as on the CPU. Files in the order tests/conftest.py gives them (the
# longest first). TEST_WORKERS=0 runs it in one process.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
