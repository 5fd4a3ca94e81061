#!/usr/bin/env bash
# Two GPUs (NCCL): the same 60 steps as one process, with DDP, with FSDP2 (bf16 mixed precision policy,
# torch.compile) and with FSDP2 + activation checkpointing; then a 2-process checkpoint resumed on 1 GPU.
# Prints the loss at steps 20/40/60 of each. Needs .bench_data/speedrun (python bench/speedrun.py prepare).
set -euo pipefail
OUT_DIR=${1:-/tmp/gpu_distributed}
rm -rf "$OUT_DIR"; mkdir -p "$OUT_DIR"
COMMON=(--data-dir .bench_data/speedrun --max-steps 60 --set model.num_layers=8 --set model.hidden_size=512
        --set model.num_attention_heads=8 --set model.max_seq_length=512 --set training.log_interval=20
        --set training.eval_interval=1000 --set training.checkpoint_interval=30 --set training.sample_tokens=20
        --set logging.progress_bar=false)
losses() { python - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
print({r["step"]: round(r["loss"], 4) for r in rows if r["event"] == "step_end"},
      "tok/s", [round(r["tokens_per_second"]) for r in rows if r["event"] == "step_end"][-1])
PY
}
time python -m llm_training.cli.train "${COMMON[@]}" --set training.batch_size=16 --output-dir "$OUT_DIR/one" > "$OUT_DIR/one.log" 2>&1
echo "1 GPU, batch 16:        $(losses "$OUT_DIR/one")"
time torchrun --nproc_per_node=2 -m llm_training.cli.train "${COMMON[@]}" --set training.batch_size=8 --output-dir "$OUT_DIR/ddp" > "$OUT_DIR/ddp.log" 2>&1
echo "2 GPUs DDP, 8 each:     $(losses "$OUT_DIR/ddp")"
time python -m llm_training.cli.train --num-gpus 2 "${COMMON[@]}" --set training.batch_size=8 --set resources.strategy=fsdp --output-dir "$OUT_DIR/fsdp" > "$OUT_DIR/fsdp.log" 2>&1
echo "2 GPUs FSDP2, 8 each:   $(losses "$OUT_DIR/fsdp")"
time torchrun --nproc_per_node=2 -m llm_training.cli.train "${COMMON[@]}" --set training.batch_size=8 --set resources.strategy=fsdp --set model.activation_checkpointing=true --output-dir "$OUT_DIR/fsdp_ac" > "$OUT_DIR/fsdp_ac.log" 2>&1
echo "2 GPUs FSDP2 + AC:      $(losses "$OUT_DIR/fsdp_ac")"
python -m llm_training.cli.train "${COMMON[@]}" --set training.batch_size=16 --output-dir "$OUT_DIR/resumed" --resume "$OUT_DIR/fsdp/checkpoints/model_step_30.pt" > "$OUT_DIR/resumed.log" 2>&1
echo "FSDP2 step 30 on 1 GPU: $(losses "$OUT_DIR/resumed")"
grep -h "training\|batch:" "$OUT_DIR/fsdp.log" | head -2
