#!/usr/bin/env bash
# The main job on one GPU (run through the device tool): with no arguments, then a GPT-2-small-sized model
# for 60 s, to show bf16 autocast, torch.compile and the GPU in use. Output: bench/results/gpu_main_job.txt.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=$(mktemp -d)
clean() { tr '\r' '\n' | grep -vE '^train: '; }
echo "date: $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, tokenizers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'tokenizers', tokenizers.__version__)"
echo "== main job, no arguments"
(cd "$work" && mkdir a && cd a && /usr/bin/time -f "wall %e s, peak host memory %M KB" python3 -m llm_training.main 2>&1 | clean)
grep -E "compile|precision" "$work"/a/config.yaml
echo "== GPT-2 small shape (12 layers, 768 wide, context 1024), 60 s budget, sample data (overfits: a throughput demo)"
(cd "$work" && mkdir b && cd b && python3 -m llm_training.main --max-time 60s \
  --set model.num_layers=12 --set model.hidden_size=768 --set model.num_attention_heads=12 \
  --set model.model_type=gpt2 --set model.max_seq_length=1024 --set training.batch_size=16 \
  --set training.optimizer=adamw --set training.learning_rate=6e-4 --set training.num_epochs=100 \
  --set training.eval_interval=1000 --set training.log_interval=20 --set data.vocab_size=8192 2>&1 | clean | grep -vE "^  " )
grep -h -E "step_end" "$work"/b/logs/system.log | cut -c1-300 | tail -3
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
