#!/usr/bin/env bash
# Creates ./.venv and installs the project into it. Safe to rerun: it only installs what is missing.
# On a machine without a CUDA GPU it first installs the pinned CPU torch wheel, because a bare
# `torch` requirement would otherwise pull a multi-GB CUDA build.
#
#   VENV=.venv-old EXTRA_PIN="transformers==5.17.*" bash scripts/setup.sh
# builds a second environment with one dependency held at another version inside its supported
# range (scripts/test.sh does this to test the oldest supported transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRA_PIN=${EXTRA_PIN:-}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
stamp=$VENV/.hyena-rtf-installed
want="$( (cat pyproject.toml scripts/setup.sh; echo "$EXTRA_PIN") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VPY" -m pip install --quiet --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing the default CUDA torch build"
    "$VPY" -m pip install --quiet torch
  else
    echo "[setup] no CUDA GPU: installing the pinned CPU wheel torch==2.13.0"
    "$VPY" -m pip install --quiet torch==2.13.0
  fi
fi
echo "[setup] installing hyena-rtf and its dependencies${EXTRA_PIN:+ with $EXTRA_PIN}"
"$VPY" -m pip install --quiet -e ".[dev]" ${EXTRA_PIN:+"$EXTRA_PIN"}
echo "$want" > "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null)"
