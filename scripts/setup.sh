#!/usr/bin/env bash
# Create .venv (Python 3.11), install the CPU build of torch first, then speechinstruct with its extras.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [EXTRAS], e.g. scripts/setup.sh test,bench
# pip's own output goes to .venv/install.log and is shown only when a step fails (setuptools prints an
# informational notice about editable installs on every run, which is not ours to show).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
log=.venv/install.log
: > "$log"
step() {  # run one install step; on failure show what pip said and stop
  if ! "$@" >>"$log" 2>&1; then
    echo "scripts/setup.sh: failed: $*" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}
step .venv/bin/python -m pip install -q --upgrade pip
# CPU torch before anything that depends on torch, so pip never resolves a multi-GB CUDA build.
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  step .venv/bin/python -m pip install -q "torch==2.13.0"
fi
step .venv/bin/python -m pip install -q -e ".[${extras}]"
# Resemblyzer's GE2E speaker encoder (score --speaker, shard audio --speakers): its weights ship in its wheel, which
# declares the `typing` backport (never to be installed on Python 3): without dependencies.
step .venv/bin/python -m pip install -q --no-deps "resemblyzer==0.1.4"
# The tests hold the VAD model we ship (speechinstruct/data/silero_vad.onnx) to silero-vad's own wheel; that wheel
# declares torchaudio, which loads only beside the torch it was built for and then breaks `import transformers`:
# installed for the tests only, without dependencies.
if [[ ",${extras}," == *",test,"* ]]; then
  step .venv/bin/python -m pip install -q --no-deps "silero-vad==6.2.0"
fi
# The tests hold our Kaldi features (MFCC, XCodec2's filterbanks) to torchaudio's own compliance.kaldi code, read
# from its wheel (tests/torchaudio_reference.py); the wheel is downloaded, never installed.
if [[ ",${extras}," == *",test,"* ]] && ! ls .venv/reference/torchaudio-2.11.0-*.whl >/dev/null 2>&1; then
  step .venv/bin/python -m pip download -q --no-deps -d .venv/reference "torchaudio==2.11.0"
fi
.venv/bin/python -c 'import speechinstruct, torch; print("speechinstruct", speechinstruct.__version__, "torch", torch.__version__)'
