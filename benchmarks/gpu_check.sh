#!/usr/bin/env bash
# The GPU check of issue 38: ../shared/gpu-check's 4-hour corpus, commands and model bench, then one benchmark row
# per GPU target (python -m benchmarks --only gpu_*), in the order of the issue's items. One device run of at
# most 600 s: every step is time-boxed and the whole run stops at TOTAL seconds (default 540), so what finished
# comes back even when a step hangs.
#
#   here (prepare):  bash benchmarks/gpu_check.sh prepare       lays out .gpu/ (git-ignored): the check, the wheels
#                                                                that machine lacks (cp312, x86-64) and the training
#                                                                row's data (made here with .venv's Python); the
#                                                                project itself runs there from the working tree
#   there:           device run, carry [".gpu"], timeout_s 600:  bash .gpu/gpu_check.sh
#   dry run here:    PYV=3.11 bash benchmarks/gpu_check.sh prepare, then, in a Python that has only what the GPU
#                    machine's image has of ours (torch, transformers, numpy, pyarrow, typer, tqdm, pyyaml, onnx,
#                    onnxruntime, scikit-learn, scipy, accelerate, peft, pandas, numba, lazy-loader, msgpack, attrs,
#                    sentencepiece, psutil, xxhash, requests): rm -rf /tmp/site /tmp/gw, then
#                    DEV=cpu HOURS=0.01 SMALL_H=0.01 GPU_DRYRUN=1 PY=that/python bash .gpu/gpu_check.sh
#
# Results in $OUT: steps.jsonl (rc and wall time per step), all.log (every step's output), model_bench.txt and
# bench.jsonl (the benchmark rows). Add a wheel to EXTRA below when a new import needs one there.
set -u
if [ "${1:-}" = prepare ]; then
  set -euo pipefail
  shared=${SHARED:-../shared/gpu-check}
  mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
  rm -rf .gpu && mkdir -p .gpu/whl && tmp=$(mktemp -d)
  cp "$shared"/mkcorpus.py "$shared"/model_bench.py .gpu/ && cp -r "$shared"/clips .gpu/ && cp benchmarks/gpu_check.sh .gpu/
  P="--only-binary=:all: --python-version ${PYV:-3.12} --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
  # ../shared/gpu-check's list (what the data path imports), then datasets and its own for the training row (the
  # rest those rows import, accelerate, onnx, sentencepiece, pandas, numba for librosa, is in that machine's image:
  # /work/.library/device/KINDS.md; a wheel here would shadow it). The training data is made here, below.
  python3 -m pip download -q --no-deps $P -d .gpu/whl soundfile soxr kaldi-native-fbank pydantic pydantic-core \
    annotated-types typing-inspection jsonschema jsonschema-specifications referencing rpds-py ijson braceexpand cffi \
    pycparser typing-extensions faiss-cpu speechmos==0.0.1.1 librosa audioread decorator pooch platformdirs praatio \
    datasets dill multiprocess fastjsonschema ${EXTRA:-}
  # the carried tree may weigh 64 MiB in all: speechmos keeps DNSMOS's networks only (AECMOS's and PLCMOS's go)
  python3 -c "import sys, zipfile, os; src = sys.argv[1]; a = zipfile.ZipFile(src); b = zipfile.ZipFile(src + '.new', 'w', zipfile.ZIP_DEFLATED); \
[b.writestr(i, a.read(i.filename)) for i in a.infolist() if not i.filename.startswith(('speechmos/aecmos_models/', 'speechmos/plcmos_models/', 'speechmos/pdnsmos_models/'))]; \
b.close(); os.replace(src + '.new', src)" .gpu/whl/speechmos-*.whl
  mkdir -p "$tmp/work" && "${PREP_PY:-.venv/bin/python}" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \
from benchmarks.__main__ import train_data; train_data(Path('$tmp/work'), quick=True)" > "$tmp/train_data.log" 2>&1 \
    || { tail -5 "$tmp/train_data.log"; exit 1; }
  mkdir -p .gpu/traindata/tiny-llama && cp -r "$tmp/work/train-data/dataset" .gpu/traindata/  # and the tokenizer alone:
  cp "$tmp"/work/tiny-llama/{tokenizer.json,tokenizer_config.json} .gpu/traindata/tiny-llama/  # the 1B model is made there
  du -sh .gpu
  exit 0
fi

G=$(cd "$(dirname "$0")" && pwd); ROOT=$(dirname "$G"); OUT=${OUT:-/tmp/gpu-check-out}; W=${W:-/tmp/gw}; DEV=${DEV:-cuda}; PY=${PY:-python3}
TOTAL=${TOTAL:-540}; T0=$(date +%s); mkdir -p "$OUT" "$W"
step() {  # step NAME LIMIT COMMAND...: time-boxed to LIMIT and to what is left of TOTAL; the log's tail printed
  local name=$1 lim=$2; shift 2; local left=$((TOTAL - ($(date +%s) - T0) - 5))
  if [ "$left" -lt 15 ]; then echo "=== $name skipped: out of time"; echo "{\"step\":\"$name\",\"skipped\":\"time\"}" >> "$OUT/steps.jsonl"; return; fi
  [ "$lim" -gt "$left" ] && lim=$left
  echo "=== $name (limit ${lim}s)"; local s=$(date +%s.%N)
  timeout -k 5 "$lim" "$@" > "$W/$name.log" 2>&1; local rc=$?
  local e=$($PY -c "print(f'{$(date +%s.%N)-$s:.1f}')"); tail -n "${TAILN:-8}" "$W/$name.log" | cut -c1-400
  echo "--- $name rc=$rc wall=${e}s"; echo "{\"step\":\"$name\",\"rc\":$rc,\"wall_s\":$e}" >> "$OUT/steps.jsonl"
  { echo "##### $name"; cat "$W/$name.log"; } >> "$OUT/all.log"; }
[ -d "${WHL:-$G/whl}" ] && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHL:-$G/whl}"/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$ROOT HF_HUB_OFFLINE=1  # the project as the working tree that travelled PYTHONUNBUFFERED=1
SI="$PY -m speechinstruct.cli"; BENCH="$PY -m benchmarks --work $W/bench --results $OUT/bench.jsonl --only"
$PY -c "import speechinstruct.cli, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi -L 2>/dev/null; nproc
# item 1 (HuBERT), 2 (k-means), 3 (DNSMOS) on the gpu-check corpus, as a user runs them
step prep 90 bash -c "$PY $G/mkcorpus.py $G/clips $W/corpus ${HOURS:-4} && $PY $G/mkcorpus.py $G/clips $W/small ${SMALL_H:-0.25} && $PY -c \"import torch; from transformers import HubertConfig, HubertModel; torch.manual_seed(0); HubertModel(HubertConfig()).save_pretrained('$W/hub')\" && $SI shard librispeech $W/corpus $W/manifest -q >/dev/null && $SI shard librispeech $W/small $W/msmall -q > /dev/null && echo prepared"
step extract_bf16 90 $SI extract $W/manifest $W/feat --features hubert --checkpoint $W/hub --layer 11 --device $DEV --dtype bfloat16
step cluster_k1000 60 $SI cluster $W/feat $W/km --k 1000
step units_fused_bf16 90 $SI extract $W/manifest $W/units --features hubert --checkpoint $W/hub --layer 11 --device $DEV --dtype bfloat16 --kmeans $W/km
step dnsmos 60 $SI score $W/msmall $W/scores --dnsmos --device $DEV
# the batch size a GPU should default to: the same extract with 400 s batches (model_bench's) against the 100 s default
step extract_bf16_b400 90 $SI extract $W/manifest $W/feat400 --features hubert --checkpoint $W/hub --layer 11 --device $DEV --dtype bfloat16 --batch-seconds 400
TAILN=30 step model_bench 120 env BENCH_DIR=$ROOT $PY $G/model_bench.py $W/manifest $W/hub $OUT/model_bench.txt
TAILN=3 step hubert_fft_posconv 90 env GPU_MANIFEST=$W/manifest $BENCH gpu_hubert  # torch's positional conv vs FFT
# items 5 (ASR), 4 (codecs), 7 (train), 2 (k-means against faiss-cpu, held-out inertia; DNSMOS against onnxruntime)
TAILN=3 step asr_parakeet 90 $BENCH gpu_asr
TAILN=12 step codecs_batched 150 $BENCH gpu_codecs  # five codecs, a row each as it ends
TAILN=3 step train_1b 120 env TRAIN_DATA=$G/traindata $BENCH gpu_train
# item 7: accelerate's FSDP2 on the GPU as a user launches it (one process: sharded checkpoints, the weights
# gathered to save, stage 3's --merge), on a small LLaMA drawn there; the dry run takes 2 CPU processes and the
# tests' shim (accelerate shards over GPU processes only)
FSDP_RUN="-m speechinstruct.cli"; NP=1; [ "$DEV" = cpu ] && { FSDP_RUN=$ROOT/tests/fsdp_on_cpu.py; NP=2; }
TAILN=12 step fsdp_stage3 90 bash -c "$PY -c \"from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM; \
t = AutoTokenizer.from_pretrained('$G/traindata/tiny-llama'); t.save_pretrained('$W/tinybase'); LlamaForCausalLM(LlamaConfig(\
vocab_size=len(t), hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8\
)).save_pretrained('$W/tinybase')\" && $PY -m accelerate.commands.launch --num_processes $NP --use_fsdp --fsdp_version 2 \
$FSDP_RUN train --stage 3 --base-model $W/tinybase --data $G/traindata/dataset --max-steps 4 --batch-size 4 --save-every 2 \
--merge --out $W/fsdp -q && grep -A3 distributed $W/fsdp/train_config.json && ls $W/fsdp/checkpoints/* $W/fsdp/merged"
TAILN=6 step kmeans_vs_faiss 150 $BENCH gpu_kmeans  # last: faiss-cpu on 1M x 768 may take it all (torch's time prints first)
echo "used $(( $(date +%s) - T0 )) s of $TOTAL"
