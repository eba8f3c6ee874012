#!/usr/bin/env bash
# Creates ./.venv and installs the project into it. Safe to rerun: it only installs what is missing.
# torch is the version in docker/TORCH_VERSION, the one pin the Docker image installs too: on a
# machine without a CUDA GPU its CPU wheel, because a bare `torch` requirement would otherwise pull
# a multi-GB CUDA build; with a GPU the CUDA build of the same version. torch comes from pip (it
# honours pip's configuration: find-links, a mirror, a cap on torch); everything else from uv, which
# resolves, downloads and compiles in parallel (set-up from a fresh clone: about 1.5 minutes, against
# 2 min 50 s with pip and its cache warm, on this project's 2-core machine) and falls back to pip
# where uv cannot reach the index pip uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.hyena-rtf-installed
TORCH_VERSION=$(tr -d '[:space:]' < docker/TORCH_VERSION)
want="$(cat pyproject.toml scripts/setup.sh docker/TORCH_VERSION | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VPY" -m pip install --quiet --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU found: installing the CUDA build of torch==$TORCH_VERSION"
    "$VPY" -m pip install --quiet "torch==$TORCH_VERSION"
  else
    echo "[setup] no CUDA GPU: installing the pinned CPU wheel torch==$TORCH_VERSION"
    "$VPY" -m pip install --quiet "torch==$TORCH_VERSION"
  fi
fi
echo "[setup] installing hyena-rtf and its dependencies"
"$VPY" -m pip install --quiet uv
# Bytecode is compiled here, once (uv does not by default): left to the first imports, every test
# worker and child process starting together compiled torch and transformers again, and where
# PYTHONDONTWRITEBYTECODE is set every process would.
if ! .venv/bin/uv pip install --quiet --python "$VPY" --compile-bytecode -e ".[dev]"; then
  echo "[setup] uv could not install the dependencies (above); installing them with pip"
  "$VPY" -m pip install --quiet -e ".[dev]"
fi
echo "$want" > "$stamp"
versions='import torch, transformers, deepspeed; print("torch", torch.__version__, "| transformers", transformers.__version__, "| deepspeed", deepspeed.__version__)'
echo "[setup] done: $("$VPY" -c "$versions" 2>/dev/null | tail -n 1)"
