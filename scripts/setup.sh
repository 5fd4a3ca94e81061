#!/usr/bin/env bash
# Create ./venv and install llm-training into it (editable, with the test tools).
#
# PyTorch: a torch already importable in the venv is kept. Otherwise torch==$TORCH_VERSION is installed:
# from PyPI that is the CUDA build on Linux (what a GPU machine needs) and the CPU/MPS build on macOS.
# On a Linux laptop without a GPU, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the small
# CPU-only wheel. To use a PyTorch you already have (e.g. a CUDA image), run with VENV_FLAGS=--system-site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x venv/bin/python ]; then
  echo "setup: creating venv with $($PYTHON --version)"
  $PYTHON -m venv ${VENV_FLAGS:-} venv
fi
. venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==$TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

stamp="venv/.llm-training-$(cat pyproject.toml | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing llm-training (editable) and its test tools"
  pip install -q -e ".[dev]"
  rm -f venv/.llm-training-* && touch "$stamp"
fi
python -c "import torch, llm_training; print(f'setup: llm-training {llm_training.__version__}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}')"
