#!/usr/bin/env bash
# The speed benchmarks on one GPU, in one command, at the 125m preset (d 768, 12 layers, vocab 50,277):
#
#   bash benchmarks/gpu_suite.sh                    # a CUDA machine: about 10 minutes on an H100/H200
#   bash benchmarks/gpu_suite.sh --dry-run          # every stage at toy sizes, CPU unless a GPU is
#   DEVICE=cpu bash benchmarks/gpu_suite.sh         #   there (~3 minutes on 2 CPU cores); same thing
#   bash benchmarks/gpu_suite.sh --only train_mfu,vendor_fftconv_bf16   # some stages only
#
# Stages, each under `timeout` (seconds below); a stage that fails or times out is reported and the
# others still run; the script exits 1 if any stage failed, 2 if it cannot start at all.
#   train_throughput  150  Hyena-RTF / implicit / GPT-NeoX training steps, lengths 512..32768,
#                          32768 tokens a step, bf16 autocast (about 1 minute: GPT-NeoX 162M runs
#                          0.12 to 0.28 s a step on an H100 at these lengths, docs/baselines.md;
#                          3 models x 7 lengths x 7 steps, plus model builds)
#   decode            270  recurrent eager / compiled (CUDA graphs) / implicit / GPT-NeoX KV cache,
#                          batch 1, 64, 256 x prompt 512, 2048, 8192, 32 new tokens (2 to 4 minutes,
#                          most of it compiling the static step once per batch size)
#   recurrence_build   60  python -m benchmarks.recurrence_build (its own defaults; --device if it has one)
#   kernel_scaling     60  RTF / S4D / implicit kernel forward+backward against the state size, d 768
#   vendor_fftconv     60  vendor FFT causal-conv kernels (subquadratic_ops_torch, cuDNN frontend)
#                          against models/fftconv.py, when importable
#   vendor_fftconv_bf16 60 the same kernels and models/fftconv.py given bfloat16 inputs (what they
#                          see under bf16 autocast): error against float64, forward+backward time
#   decode_cudagraphs 150  recurrent eager against the static step compiled with CUDA graphs
#                          (torch.compile mode="reduce-overhead"), batch 1..256, prompt 2048,
#                          256 new tokens: long enough for graph replay to dominate
#   train_mfu         240  MFU of the 125m preset through train.py itself (one GPU, micro batch 8 x
#                          2048 tokens, 300 steps, no evaluation or checkpoint), fp32 (TF32 on)
#                          then bf16, on random tokens of a 50,277-word vocabulary: the median of
#                          the logged windows after the first (warm-up, compilation)
#
# Every JSON goes to $OUT_DIR (default benchmarks/results/; the dry run writes to a temporary folder)
# as <stage>_<device>_<gpu-slug>_<date>.json, PNG beside it; the JSON's machine section names the
# GPU and the date too. Needs python with torch and transformers (matplotlib only for the PNGs;
# omegaconf, deepspeed and datasets are not imported). It runs from the repository root, where the
# project's folders are its packages; nothing of the project needs installing.
# PYTHON (default .venv/bin/python if present, else python3) and OUT_DIR may be set.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) [ $# -ge 2 ] || { echo "gpu_suite.sh: error: --only needs a comma-separated list of stages" >&2; exit 2; }
      ONLY=",$2,"; shift ;;
    --only=*) ONLY=",${1#--only=},";;
    *) echo "gpu_suite.sh: error: unknown argument '$1' (--dry-run, --only STAGE[,STAGE...])" >&2; exit 2 ;;
  esac
  shift
done
STAGES=",train_throughput,decode,recurrence_build,kernel_scaling,vendor_fftconv,vendor_fftconv_bf16,decode_cudagraphs,train_mfu,"
if [ -n "$ONLY" ]; then
  for want in ${ONLY//,/ }; do
    case "$STAGES" in *",$want,"*) ;; *) echo "gpu_suite.sh: error: unknown stage '$want' (${STAGES:1:-1})" >&2; exit 2 ;; esac
  done
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch, transformers" 2>/dev/null; then
  echo "gpu_suite.sh: error: $PYTHON cannot import torch and transformers (set PYTHON=...)" >&2
  exit 2
fi
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
DEVICE=${DEVICE:-$([ "$HAS_CUDA" = 1 ] && echo cuda || echo cpu)}
[ "$DEVICE" = cpu ] && DRY=1
if [ "$DEVICE" = cuda ] && [ "$HAS_CUDA" != 1 ]; then
  echo "gpu_suite.sh: error: DEVICE=cuda but torch sees no CUDA device (DEVICE=cpu for the dry run)" >&2
  exit 2
fi

# The project's folders are its packages: importable from here and by every child process.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for optional in matplotlib psutil; do
  "$PYTHON" -c "import $optional" 2>/dev/null || echo "[suite] note: $optional is not installed (no PNGs / RSS memory)"
done

SLUG=$("$PYTHON" -c "
import re, torch
name = torch.cuda.get_device_name(0) if '$DEVICE' == 'cuda' else 'cpu'
print(re.sub('[^a-z0-9]+', '-', name.lower()).strip('-'))")
DATE=$(date -u +%Y%m%d)
if [ "$DRY" = 1 ]; then OUT_DIR=${OUT_DIR:-$(mktemp -d)}; else OUT_DIR=${OUT_DIR:-benchmarks/results}; fi
mkdir -p "$OUT_DIR"
name() { echo "$OUT_DIR/$1_${DEVICE}_${SLUG}_${DATE}"; }
echo "[suite] $DEVICE ($SLUG), $([ "$DRY" = 1 ] && echo 'dry run at toy sizes' || echo '125m preset'), results in $OUT_DIR"

FAILED=()
stage() {  # stage NAME TIMEOUT_S COMMAND...  (skipped when --only does not name it)
  local label=$1 limit=$2 start rc
  shift 2
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$label,"* ]]; then return 0; fi
  echo "[suite] >>> $label (timeout ${limit} s): $*"
  start=$(date +%s)
  timeout --kill-after=20 "$limit" "$@"
  rc=$?
  if [ "$rc" = 0 ]; then
    echo "[suite] <<< $label: ok in $(($(date +%s) - start)) s"
  else
    [ "$rc" = 124 ] && why="timed out after $limit s" || why="exit status $rc"
    echo "[suite] <<< $label: FAILED ($why)" >&2
    FAILED+=("$label")
  fi
}

if [ "$DRY" = 1 ]; then
  TINY=(--device "$DEVICE" --preset tiny --d-model 32 --vocab-size 256)
  stage train_throughput 120 "$PYTHON" -m benchmarks.train.throughput "${TINY[@]}" --lengths 32,64 \
    --tokens-per-step 128 --warmup 1 --steps 1 --out "$(name train_throughput).json"
  stage decode 120 "$PYTHON" -m benchmarks.decode "${TINY[@]}" --prompt-lengths 16,32 --batch-sizes 2 \
    --new-tokens 3 --compile-backend eager --out "$(name decode).json"
  KS_ARGS=(--device "$DEVICE" --d-model 4 --lengths 128 --states 4,16 --repeats 2)
  VF_ARGS=(--device "$DEVICE" --d-model 8 --lengths 64,128 --tokens 256 --repeats 2)
else
  stage train_throughput 150 "$PYTHON" -m benchmarks.train.throughput --device cuda --preset 125m \
    --lengths 512,1024,2048,4096,8192,16384,32768 --tokens-per-step 32768 --warmup 2 --steps 5 \
    --budget-s 60 --out "$(name train_throughput).json"
  stage decode 270 "$PYTHON" -m benchmarks.decode --device cuda --preset 125m --batch-sizes 1,64,256 \
    --prompt-lengths 512,2048,8192 --new-tokens 32 --budget-s 20 --out "$(name decode).json"
  KS_ARGS=(--device cuda --d-model 768 --lengths 1024,4096 --states 4,16,64,256,1024,2048 --repeats 10
    --time-budget 2 --max-bytes 60e9)
  VF_ARGS=(--device cuda --d-model 768 --lengths 1024,2048,4096,8192,16384 --tokens 16384 --repeats 20)
fi
if [ -n "$ONLY" ] && [[ "$ONLY" != *",recurrence_build,"* ]]; then
  :
elif [ -f benchmarks/recurrence_build.py ]; then
  # Its options are its author's: use the ones its --help lists (it has run on CPU only so far).
  RB_HELP=$("$PYTHON" -m benchmarks.recurrence_build --help 2>/dev/null || true)
  RB_ARGS=()
  grep -q -- --device <<<"$RB_HELP" && RB_ARGS+=(--device "$DEVICE")
  if grep -q -- --layers <<<"$RB_HELP"; then
    if [ "$DRY" = 1 ]; then RB_ARGS+=(--layers tiny --repeats 1); else RB_ARGS+=(--layers 125m); fi
  fi
  grep -q -- --out <<<"$RB_HELP" && RB_ARGS+=(--out "$(name recurrence_build)")
  stage recurrence_build 60 "$PYTHON" -m benchmarks.recurrence_build "${RB_ARGS[@]}"
else
  echo "[suite] recurrence_build: skipped (benchmarks/recurrence_build.py does not exist)"
fi
stage kernel_scaling 60 "$PYTHON" -m benchmarks.kernel_scaling "${KS_ARGS[@]}" --out "$(name kernel_scaling)"
stage vendor_fftconv 60 "$PYTHON" -m benchmarks.vendor_fftconv "${VF_ARGS[@]}" --out "$(name vendor_fftconv).json"

# The vendor kernels as bf16 autocast would feed them: bfloat16 inputs, errors against float64.
vendor_bf16() {  # vendor_bf16 OUT_JSON DEVICE D_MODEL LENGTHS TOKENS REPEATS
  "$PYTHON" - "$@" <<'PY'
import sys

import torch

from benchmarks.common import machine, write_json
from benchmarks.vendor_fftconv import fwd_bwd, load_kernels, median_ms, rel_error
from models.fftconv import fft_causal_conv

out, device, d, lengths, tokens, repeats = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
rows = []
for T in map(int, lengths.split(",")):
    gen = torch.Generator(device=device).manual_seed(T)
    u = torch.randn(max(1, tokens // T), d, T, device=device, generator=gen)
    k = torch.randn(d, T, device=device, generator=gen) * torch.exp(-torch.arange(T, device=device) / (T / 4))
    ref = fft_causal_conv(u.double(), k.double())
    ub, kb = u.bfloat16(), k.bfloat16()
    for name, fn in [("models.fftconv", fft_causal_conv), *load_kernels().items()]:
        row = {"kernel": name, "length": T, "batch": u.shape[0], "d_model": d, "input_dtype": "bfloat16"}
        if isinstance(fn, str) or (name != "models.fftconv" and device.type != "cuda"):
            rows.append({**row, "status": "not available", "reason": fn if isinstance(fn, str) else "needs CUDA"})
            continue
        try:
            y = fn(ub, kb)
            row.update(status="ok", output_dtype=str(y.dtype).removeprefix("torch."), error=rel_error(y, ref),
                       fwd_ms=median_ms(lambda: fn(ub, kb), device, repeats),
                       fwd_bwd_ms=median_ms(fwd_bwd(fn, ub, kb), device, repeats))
        except Exception as e:  # an unsupported dtype or shape: recorded, the others go on
            row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0])
        rows.append(row)
        print(f"[vendor_fftconv_bf16] {row}", flush=True)
write_json(out, {"benchmark": "vendor_fftconv_bf16", "machine": machine(device), "device": str(device), "rows": rows})
PY
}

# train.py's own MFU: a prepared folder of random tokens (a word-level tokenizer of VOCAB words,
# word 0 the end-of-document token), then one short run per precision, then their summary.
mfu_data() {  # mfu_data FOLDER VOCAB WORDS
  "$PYTHON" - "$@" <<'PY'
import os
import sys

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

folder, vocab, words = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(folder, exist_ok=True)
names = ["<|endoftext|>"] + [f"w{i}" for i in range(1, vocab)]
tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<|endoftext|>"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(os.path.join(folder, "tokenizer.json"))
ids = np.random.default_rng(0).integers(1, vocab, size=words)
with open(os.path.join(folder, "words.txt"), "w") as f:
    for start in range(0, words, 4096):  # lines of 4096 words
        f.write(" ".join(names[i] for i in ids[start : start + 4096]) + "\n")
PY
  "$PYTHON" -m data_prep.prepare --input "$1/words.txt" --tokenizer "$1/tokenizer.json" \
    --out "$1/prepared" --val-fraction 0.05 --text-chunk-bytes 8192 --no-progress --workers 4 >/dev/null
}

mfu_summary() {  # mfu_summary OUT_JSON RUN_DIR...
  "$PYTHON" - "$@" <<'PY'
import json
import os
import statistics
import sys

import torch

from benchmarks.common import machine, write_json
from training.metrics import read_metrics

runs = {}
for run in sys.argv[2:]:
    recs = read_metrics(os.path.join(run, "metrics.jsonl"))[1:]  # the first window: warm-up
    with open(os.path.join(run, "config.yaml")) as f:
        precision = next(line.split(":")[1].strip() for line in f if line.strip().startswith("precision:"))
    runs[precision] = {
        "windows": len(recs),
        "steps": recs[-1]["step"] if recs else 0,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs) if recs else None,
        "mfu": statistics.median(r["mfu"] for r in recs) if recs and "mfu" in recs[0] else None,
    }
    print(f"[train_mfu] {precision}: {runs[precision]}", flush=True)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
write_json(sys.argv[1], {"benchmark": "train_mfu", "machine": machine(device), "runs": runs})
PY
}

train_mfu() {  # train_mfu OUT_JSON WORK_DIR VOCAB WORDS STEPS LOG_EVERY OVERRIDES...
  local out=$1 work=$2 vocab=$3 words=$4 steps=$5 every=$6 precision
  shift 6
  mfu_data "$work/data" "$vocab" "$words" || return 1
  for precision in fp32 bf16; do
    "$PYTHON" train.py --config configs/pile_125m.yaml "data.dir=$work/data/prepared" \
      "train.out_dir=$work/run_$precision" "train.precision=$precision" "train.max_steps=$steps" \
      train.engine=single train.global_batch_size=null train.grad_accum_steps=1 train.eval_every=0 \
      checkpoint.every=0 checkpoint.export_at_end=false "logging.log_every=$every" \
      logging.progress_bar=false schedule.warmup_steps=10 data.eval_samples=8 "$@" || return 1
  done
  mfu_summary "$out" "$work/run_fp32" "$work/run_bf16"
}
export -f vendor_bf16 mfu_data mfu_summary train_mfu
export PYTHON

MFU_WORK=$(mktemp -d)
if [ "$DRY" = 1 ]; then
  stage vendor_fftconv_bf16 60 bash -c 'vendor_bf16 "$@"' _ "$(name vendor_fftconv_bf16).json" "$DEVICE" 8 64,128 256 2
  stage decode_cudagraphs 120 "$PYTHON" -m benchmarks.decode "${TINY[@]}" --methods hyena_rtf_recurrent,hyena_rtf_compiled \
    --prompt-lengths 16 --batch-sizes 1,2 --new-tokens 4 --compile-backend eager --out "$(name decode_cudagraphs).json"
  stage train_mfu 180 bash -c 'train_mfu "$@"' _ "$(name train_mfu).json" "$MFU_WORK" 300 60000 4 2 \
    model.d_model=32 model.n_layer=2 model.state_size=4 data.seq_len=64 train.micro_batch_size=2 train.device=cpu
else
  stage vendor_fftconv_bf16 60 bash -c 'vendor_bf16 "$@"' _ "$(name vendor_fftconv_bf16).json" cuda 768 \
    1024,2048,4096,8192,16384 16384 20
  stage decode_cudagraphs 150 "$PYTHON" -m benchmarks.decode --device cuda --preset 125m \
    --methods hyena_rtf_recurrent,hyena_rtf_compiled --batch-sizes 1,16,64,256 --prompt-lengths 2048 \
    --new-tokens 256 --repeats 2 --budget-s 30 --out "$(name decode_cudagraphs).json"
  stage train_mfu 240 bash -c 'train_mfu "$@"' _ "$(name train_mfu).json" "$MFU_WORK" 50277 1000000 300 50 \
    train.micro_batch_size=8 train.device=cuda
fi
rm -rf "$MFU_WORK"

echo "[suite] results:"
ls -1 "$OUT_DIR" | sed 's/^/[suite]   /'
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "[suite] FAILED stages: ${FAILED[*]}" >&2
  exit 1
fi
echo "[suite] all stages ok"
