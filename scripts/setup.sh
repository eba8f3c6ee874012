#!/usr/bin/env bash
# Creates ./.venv and installs the project into it. Safe to rerun: it only installs what is missing.
# On a machine without a CUDA GPU it first installs the pinned CPU torch wheel, because a bare
# `torch` requirement would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.hyena-rtf-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
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
echo "[setup] installing hyena-rtf and its dependencies"
"$VPY" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "[setup] done: $("$VPY" -c 'import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)' 2>/dev/null)"
