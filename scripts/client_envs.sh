#!/usr/bin/env bash
# Client environments for tests/test_export_hf_clients.py: venv-clients/tf4, a venv with transformers 4.x
# and without llm-training, where the Hugging Face export is loaded as a user of transformers 4 would
# (./venv has transformers 5.x). Fast when already done (a stamp names what was installed).
#
# torch: the version of ./venv's torch (else $TORCH_VERSION), from $TORCH_INDEX_URL when set (as in
# scripts/setup.sh; https://download.pytorch.org/whl/cpu is the small CPU build the client test needs).
# A failure removes the half-made venv (the tests then skip, naming this script) and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-$(venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null \
  || echo 2.13.0)}
env=venv-clients/tf4
packages=("torch==$TORCH_VERSION" "transformers>=4.45,<5" safetensors tokenizers numpy)
stamp="$env/.ready-$(echo "${packages[*]}" | sha256sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

echo "client envs: creating $env (transformers 4.x, for the export's client tests)"
rm -rf "$env"
trap 'rm -rf "$env"; echo "client envs: could not create $env; the transformers 4.x client tests will skip" >&2' ERR
$PYTHON -m venv "$env"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$env/bin/pip" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$env/bin/pip" install -q "${packages[@]:1}"
"$env/bin/python" -I -c "import torch, transformers; assert transformers.__version__.startswith('4.')"
touch "$stamp"
