#!/usr/bin/env bash
# Issue 21's GPU checks, through the device tool: the fine-tuning benchmarks (ours against HF Trainer + peft,
# LoRA against QLoRA, packing against padding) with ``bench``, the CUDA tests of fine-tuning with ``tests``.
# bitsandbytes travels as a wheel in .whl (see the device tool's README); the corpora and tokenizers in
# .devshared when ../shared is absent.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -d ../shared ] || { mkdir -p ../shared && cp -r .devshared/* ../shared/; }
echo "date: $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
case "${1:-bench}" in
  bench)
    python3 bench/finetune.py --device cuda --out bench/results/finetune_gpu.txt
    python3 bench/qlora_memory.py --out bench/results/qlora_memory.txt ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_finetune.py -k cuda 2>&1 | tail -5
    python3 -m pytest -q -p no:cacheprovider tests/test_packing.py tests/test_qlora.py 2>&1 | tail -15
    python3 bench/packing.py --device cuda --hidden 896 --layers 24 --heads 14 --kv-heads 2 \
      --intermediate 4864 --window 2048 --batch 16 --steps 20 --out bench/results/packing_gpu.txt ;;
esac
