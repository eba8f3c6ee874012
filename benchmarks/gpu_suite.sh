#!/usr/bin/env bash
# The speed benchmarks on one GPU, in one command, at the 125m preset (d 768, 12 layers, vocab 50,277):
#
#   bash benchmarks/gpu_suite.sh                    # a CUDA machine: about 6 minutes on an H100/H200
#   bash benchmarks/gpu_suite.sh --dry-run          # every stage at toy sizes, CPU unless a GPU is
#   DEVICE=cpu bash benchmarks/gpu_suite.sh         #   there (~2 minutes on 2 CPU cores); same thing
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
#
# Every JSON goes to $OUT_DIR (default benchmarks/results/; the dry run writes to a temporary folder)
# as <stage>_<device>_<gpu-slug>_<date>.json, PNG beside it; the JSON's machine section names the
# GPU and the date too. Needs python with torch and transformers (matplotlib only for the PNGs;
# omegaconf, deepspeed and datasets are not imported). If the project is not installed, the
# hyena_rtf package is mapped onto this checkout through a temporary folder on PYTHONPATH.
# PYTHON (default .venv/bin/python if present, else python3) and OUT_DIR may be set.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "gpu_suite.sh: error: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
  esac
done
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

# The project's modules as hyena_rtf.<folder>, without installing anything.
if ! "$PYTHON" -c "import hyena_rtf.models" 2>/dev/null; then
  shim=$(mktemp -d)
  mkdir "$shim/hyena_rtf"
  for pkg in models data_prep training hf utils; do ln -s "$PWD/$pkg" "$shim/hyena_rtf/$pkg"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  echo "[suite] hyena_rtf is not installed: mapped onto $PWD through $shim"
fi
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
stage() {  # stage NAME TIMEOUT_S COMMAND...
  local label=$1 limit=$2 start rc
  shift 2
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
  stage train_throughput 120 "$PYTHON" -m benchmarks.train_throughput "${TINY[@]}" --lengths 32,64 \
    --tokens-per-step 128 --warmup 1 --steps 1 --out "$(name train_throughput).json"
  stage decode 120 "$PYTHON" -m benchmarks.decode "${TINY[@]}" --prompt-lengths 16,32 --batch-sizes 2 \
    --new-tokens 3 --compile-backend eager --out "$(name decode).json"
  KS_ARGS=(--device "$DEVICE" --d-model 4 --lengths 128 --states 4,16 --repeats 2)
  VF_ARGS=(--device "$DEVICE" --d-model 8 --lengths 64,128 --tokens 256 --repeats 2)
else
  stage train_throughput 150 "$PYTHON" -m benchmarks.train_throughput --device cuda --preset 125m \
    --lengths 512,1024,2048,4096,8192,16384,32768 --tokens-per-step 32768 --warmup 2 --steps 5 \
    --budget-s 60 --out "$(name train_throughput).json"
  stage decode 270 "$PYTHON" -m benchmarks.decode --device cuda --preset 125m --batch-sizes 1,64,256 \
    --prompt-lengths 512,2048,8192 --new-tokens 32 --budget-s 20 --out "$(name decode).json"
  KS_ARGS=(--device cuda --d-model 768 --lengths 1024,4096 --states 4,16,64,256,1024,2048 --repeats 10
    --time-budget 2 --max-bytes 60e9)
  VF_ARGS=(--device cuda --d-model 768 --lengths 1024,2048,4096,8192,16384 --tokens 16384 --repeats 20)
fi
if [ -f benchmarks/recurrence_build.py ]; then
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

echo "[suite] results:"
ls -1 "$OUT_DIR" | sed 's/^/[suite]   /'
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "[suite] FAILED stages: ${FAILED[*]}" >&2
  exit 1
fi
echo "[suite] all stages ok"
