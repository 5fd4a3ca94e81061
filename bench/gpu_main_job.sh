#!/usr/bin/env bash
# The main job on one GPU (run through the device tool): with no arguments, then a GPT-2-small-sized model
# for 60 s, to show bf16 autocast, torch.compile and the GPU in use. Output: bench/results/gpu_main_job.txt.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=$(mktemp -d)
echo "date: $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, tokenizers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'tokenizers', tokenizers.__version__)"
echo "== main job, no arguments"
(cd "$work" && mkdir a && cd a && /usr/bin/time -v python3 -m llm_training.main 2> >(grep -vE '^\s*train:|it/s|s/s' >&2) ) 2>&1 | grep -vE "Minor|Major|Voluntary|Involuntary|Swaps|File system|Socket|Signals|Page size|Average|Exit status|Percent|System time|User time" 
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
echo "== GPT-2 small shape (12 layers, 768 wide, context 1024), 60 s budget, sample data"
(cd "$work" && mkdir b && cd b && python3 -m llm_training.main --max-time 60s \
  --set model.num_layers=12 --set model.hidden_size=768 --set model.num_attention_heads=12 \
  --set model.max_seq_length=1024 --set training.batch_size=16 --set training.learning_rate=6e-4 \
  --set training.eval_interval=1000 --set training.log_interval=20 --set data.vocab_size=8192 2>&1 | tr '\r' '\n' | grep -E "training|step|done|validation|tok_s" | tail -25)
grep -h step_end "$work"/b/logs/system.log | tail -3
