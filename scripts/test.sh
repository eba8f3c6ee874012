#!/usr/bin/env bash
# Installs everything on a fresh machine (scripts/setup.sh), then runs the whole test suite on the CPU
# with the newest transformers pip resolves, and the Hugging Face-facing tests (marker `hf`) again
# under the oldest release pyproject.toml admits (a second environment, .venv-transformers-X.Y).
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
PARALLEL=(-n "${TEST_WORKERS:-auto}" --dist loadfile)
.venv/bin/python -m pytest -q "${PARALLEL[@]}"
oldest=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "scripts/test.sh: no transformers>=X.Y lower bound in pyproject.toml" >&2; exit 1; }
echo "[test] the Hugging Face contract again under the oldest supported transformers ($oldest)"
VENV=.venv-transformers-$oldest EXTRA_PIN="transformers==$oldest.*" bash scripts/setup.sh
exec ".venv-transformers-$oldest/bin/python" -m pytest -q -m hf "${PARALLEL[@]}"
