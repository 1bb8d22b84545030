#!/usr/bin/env bash
# The main job on the embedded default: set up .venv (CPU torch first), then build a SpeechInstruct
# dataset from a demo corpus spoken by espeak-ng. No weights, no network. Output: work/mini/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/speechinstruct run recipes/mini.yaml "$@"
